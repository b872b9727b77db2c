//! Who may come in: a request takes a slot of its tenant's quota (`quota`) and one of
//! the router's `--max-inflight`, and holds both for its whole life through a [`Permit`];
//! a draining router refuses everything. Refusals for load are RESOURCE_EXHAUSTED with a
//! `retry-after` ([`overloaded`]), counted by reason.
//!
//! It does not check requests (`validate`) or keys (`keys`): it counts.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tonic::Status;

use crate::keys::Tenant;
use crate::metrics;
use crate::quota::{Quotas, TenantPermit, ANONYMOUS};

/// The router's door: its in-flight limit, its tenants' quotas, and whether it drains.
pub struct Admission {
    /// Requests in flight at most; beyond, RESOURCE_EXHAUSTED.
    pub max_inflight: usize,
    pub inflight: AtomicUsize,
    /// Set when the router drains: every new request is UNAVAILABLE.
    pub draining: AtomicBool,
    /// Requests in flight per tenant, against each tenant's limit.
    pub quotas: Quotas,
}

impl Admission {
    pub fn new(max_inflight: usize, quotas: Quotas) -> Self {
        Admission { max_inflight, inflight: AtomicUsize::new(0), draining: AtomicBool::new(false), quotas }
    }

    /// Takes a slot of the caller's tenant, then one of the router's. The tenant's comes
    /// first so that a tenant over its limit never holds, even for a moment, a slot another
    /// tenant could have had.
    pub fn admit(self: &Arc<Self>, tenant: Option<&Tenant>) -> Result<Permit, Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the router is shutting down"));
        }
        let tenant = self.quotas.acquire(tenant.map_or(ANONYMOUS, |t| t.0.as_str())).map_err(|r| {
            metrics::admission_refused("tenant_limit");
            // Only the caller's own limit: nothing about other tenants.
            overloaded(format!(
                "your tenant has {} requests in flight, its limit (the per-tenant limit); retry later",
                r.limit
            ))
        })?;
        let n = self.inflight.fetch_add(1, Ordering::SeqCst);
        let permit = Permit { admission: self.clone(), _tenant: tenant };
        if n >= self.max_inflight {
            metrics::admission_refused("max_inflight");
            return Err(overloaded(format!(
                "the router has {} requests in flight, its limit; retry later",
                self.max_inflight
            )));
        }
        Ok(permit)
    }
}

/// A request admitted past the in-flight limit and its tenant's; releases both slots
/// when dropped, however the request ends.
pub struct Permit {
    admission: Arc<Admission>,
    _tenant: TenantPermit,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// RESOURCE_EXHAUSTED with `retry-after` metadata (as HTTP's Retry-After: seconds to wait).
pub fn overloaded(message: String) -> Status {
    let mut st = Status::resource_exhausted(message);
    st.metadata_mut().insert("retry-after", tonic::metadata::MetadataValue::from_static("1"));
    st
}
