//! Per-tenant limits on requests in flight.
//!
//! A tenant is what an API key names (`TENANT:KEY`, or a plain `KEY` as a tenant of its
//! own); with an open API every client is one anonymous tenant. Each tenant may hold at
//! most its limit of the router's in-flight requests, so one tenant's burst, or its
//! clients that never read their streams, cannot take every slot of `--max-inflight`
//! from the others.
//!
//! [`TenantLimits`] says what each tenant may hold (a default and per-tenant overrides,
//! resolved from the flags by [`TenantLimits::resolve`]); [`TenantCounts`] is the pure
//! bookkeeping (no locks, no I/O); [`Quotas`] shares it between the router's handlers
//! and hands out [`TenantPermit`]s, which give their slot back when dropped, however the
//! request ends. This module does not know keys or statuses: `keys` names the tenant and
//! `admission` turns a [`Refused`] into RESOURCE_EXHAUSTED.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// The name under which an open API's clients (no keys configured) are counted.
pub const ANONYMOUS: &str = "";

/// What each tenant may hold in flight.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantLimits {
    /// The limit of a tenant without an override; `None`: only `--max-inflight` bounds it.
    pub default: Option<usize>,
    /// Limits of named tenants, in place of the default.
    pub overrides: BTreeMap<String, usize>,
}

impl TenantLimits {
    /// The limit of `tenant`, if it has one.
    pub fn limit_of(&self, tenant: &str) -> Option<usize> {
        self.overrides.get(tenant).copied().or(self.default)
    }

    /// The limits the router runs with, from its flags.
    ///
    /// - `default`: `--tenant-max-inflight`; absent, half of `max_inflight` (rounded up)
    ///   when the keys name two tenants or more, else none: a single tenant, or an open
    ///   API's single anonymous tenant, would only be held to `--max-inflight` twice.
    /// - `overrides`: `--tenant-limit TENANT=N`; each must name a tenant of `tenants` (a
    ///   misspelt name would silently limit nobody), at most once, and needs keys.
    /// - `tenants`: the tenants the API keys name; empty: the API is open.
    pub fn resolve(
        default: Option<usize>,
        overrides: &[(String, usize)],
        tenants: &BTreeSet<String>,
        max_inflight: usize,
    ) -> Result<TenantLimits, LimitError> {
        if default == Some(0) || overrides.iter().any(|(_, n)| *n == 0) {
            return Err(LimitError::Zero);
        }
        if !overrides.is_empty() && tenants.is_empty() {
            return Err(LimitError::NoKeys);
        }
        let mut named = BTreeMap::new();
        for (tenant, n) in overrides {
            if !tenants.contains(tenant) {
                return Err(LimitError::UnknownTenant { tenant: tenant.clone(), limit: *n });
            }
            if named.insert(tenant.clone(), *n).is_some() {
                return Err(LimitError::Twice(tenant.clone()));
            }
        }
        let default = default.or_else(|| (tenants.len() >= 2).then(|| max_inflight.div_ceil(2).max(1)));
        Ok(TenantLimits { default, overrides: named })
    }
}

/// Per-tenant limits the flags cannot mean.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("a per-tenant limit must be at least 1")]
    Zero,
    #[error("--tenant-limit needs API keys (--api-key TENANT:KEY) to name tenants")]
    NoKeys,
    #[error("--tenant-limit {tenant}={limit}: no API key names the tenant {tenant:?}")]
    UnknownTenant { tenant: String, limit: usize },
    #[error("--tenant-limit names the tenant {0:?} twice")]
    Twice(String),
}

/// A request its tenant's limit refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The tenant's limit, which it holds in flight already.
    pub limit: usize,
}

/// Requests in flight per tenant against [`TenantLimits`]. Only tenants with a request in
/// flight have an entry, so the table is as large as the work the router holds.
#[derive(Debug, Default)]
pub struct TenantCounts {
    limits: TenantLimits,
    in_flight: HashMap<String, usize>,
}

impl TenantCounts {
    pub fn new(limits: TenantLimits) -> Self {
        TenantCounts { limits, in_flight: HashMap::new() }
    }

    pub fn limits(&self) -> &TenantLimits {
        &self.limits
    }

    /// Counts one more request of `tenant`, unless it holds its limit already.
    pub fn acquire(&mut self, tenant: &str) -> Result<(), Refused> {
        let held = self.in_flight.get(tenant).copied().unwrap_or(0);
        if let Some(limit) = self.limits.limit_of(tenant) {
            if held >= limit {
                return Err(Refused { limit });
            }
        }
        self.in_flight.insert(tenant.to_string(), held + 1);
        Ok(())
    }

    /// Gives back one request of `tenant` (each successful `acquire`, exactly once).
    pub fn release(&mut self, tenant: &str) {
        match self.in_flight.get_mut(tenant) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.in_flight.remove(tenant);
            }
            None => debug_assert!(false, "released a slot of {tenant:?} that was not held"),
        }
    }

    /// Requests `tenant` holds in flight.
    pub fn in_flight(&self, tenant: &str) -> usize {
        self.in_flight.get(tenant).copied().unwrap_or(0)
    }

    /// Tenants with a request in flight.
    pub fn tenants_in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// [`TenantCounts`] shared by the router's handlers.
#[derive(Debug, Clone, Default)]
pub struct Quotas(Arc<Mutex<TenantCounts>>);

impl Quotas {
    pub fn new(limits: TenantLimits) -> Self {
        Quotas(Arc::new(Mutex::new(TenantCounts::new(limits))))
    }

    /// A slot of `tenant`'s, held until the permit drops.
    pub fn acquire(&self, tenant: &str) -> Result<TenantPermit, Refused> {
        self.lock().acquire(tenant)?;
        Ok(TenantPermit { counts: self.0.clone(), tenant: tenant.to_string() })
    }

    /// The limits in force.
    pub fn limits(&self) -> TenantLimits {
        self.lock().limits().clone()
    }

    /// Requests `tenant` holds in flight.
    pub fn in_flight(&self, tenant: &str) -> usize {
        self.lock().in_flight(tenant)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TenantCounts> {
        // The counts stay consistent whatever a panicking holder did: each step is one
        // map update.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One request's slot in its tenant's limit; given back when dropped.
#[derive(Debug)]
pub struct TenantPermit {
    counts: Arc<Mutex<TenantCounts>>,
    tenant: String,
}

impl Drop for TenantPermit {
    fn drop(&mut self) {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).release(&self.tenant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenants(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn overrides(pairs: &[(&str, usize)]) -> Vec<(String, usize)> {
        pairs.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    }

    #[test]
    fn the_default_is_on_for_two_tenants_or_more_and_flags_win() {
        // (explicit default, overrides, tenants, --max-inflight, the default resolved)
        type Case = (Option<usize>, Vec<(String, usize)>, BTreeSet<String>, usize, Option<usize>);
        let cases: Vec<Case> = vec![
            // Open API, one anonymous tenant: no bound beyond --max-inflight.
            (None, vec![], tenants(&[]), 8, None),
            // One tenant: the same.
            (None, vec![], tenants(&["acme"]), 8, None),
            // Two tenants or more: half of --max-inflight, rounded up.
            (None, vec![], tenants(&["acme", "beta"]), 8, Some(4)),
            (None, vec![], tenants(&["a", "b", "c"]), 9, Some(5)),
            (None, vec![], tenants(&["a", "b"]), 1, Some(1)),
            (None, vec![], tenants(&["a", "b"]), 512, Some(256)),
            // An explicit default wins, keys or not.
            (Some(3), vec![], tenants(&["acme", "beta"]), 8, Some(3)),
            (Some(3), vec![], tenants(&["acme"]), 8, Some(3)),
            (Some(2), vec![], tenants(&[]), 8, Some(2)),
            (Some(20), vec![], tenants(&["a", "b"]), 8, Some(20)),
        ];
        for (explicit, ov, ts, max, want) in cases {
            let got = TenantLimits::resolve(explicit, &ov, &ts, max).unwrap();
            assert_eq!(got.default, want, "{explicit:?} {ts:?} {max}");
        }
    }

    #[test]
    fn overrides_name_known_tenants_once() {
        let ts = tenants(&["acme", "beta"]);
        let l = TenantLimits::resolve(None, &overrides(&[("beta", 6)]), &ts, 8).unwrap();
        assert_eq!((l.limit_of("acme"), l.limit_of("beta")), (Some(4), Some(6)));
        let l = TenantLimits::resolve(None, &overrides(&[("acme", 1)]), &tenants(&["acme"]), 8).unwrap();
        assert_eq!((l.default, l.limit_of("acme")), (None, Some(1)), "one tenant: only its override");

        let refused = [
            (None, overrides(&[("acmee", 2)]), ts.clone(), "no API key names the tenant \"acmee\""),
            (None, overrides(&[("acme", 2), ("acme", 3)]), ts.clone(), "twice"),
            (None, overrides(&[("acme", 2)]), tenants(&[]), "needs API keys"),
            (None, overrides(&[("acme", 0)]), ts.clone(), "at least 1"),
            (Some(0), vec![], ts.clone(), "at least 1"),
        ];
        for (d, ov, ts, why) in refused {
            let e = TenantLimits::resolve(d, &ov, &ts, 8).unwrap_err().to_string();
            assert!(e.contains(why), "{ov:?}: {e}");
        }
    }

    #[test]
    fn counts_refuse_at_the_limit_and_give_slots_back() {
        let limits = TenantLimits { default: Some(2), overrides: BTreeMap::from([("big".to_string(), 3)]) };
        let mut c = TenantCounts::new(limits);
        // (tenant, acquire (true) or release (false), expected result of an acquire, in flight after)
        let steps: &[(&str, bool, Result<(), Refused>, usize)] = &[
            ("a", true, Ok(()), 1),
            ("a", true, Ok(()), 2),
            ("a", true, Err(Refused { limit: 2 }), 2),
            ("b", true, Ok(()), 1),
            ("big", true, Ok(()), 1),
            ("big", true, Ok(()), 2),
            ("big", true, Ok(()), 3),
            ("big", true, Err(Refused { limit: 3 }), 3),
            ("a", false, Ok(()), 1),
            ("a", true, Ok(()), 2),
            ("a", true, Err(Refused { limit: 2 }), 2),
            ("a", false, Ok(()), 1),
            ("a", false, Ok(()), 0),
            ("b", false, Ok(()), 0),
        ];
        for (i, &(t, acquire, want, after)) in steps.iter().enumerate() {
            if acquire {
                assert_eq!(c.acquire(t), want, "step {i}: {t}");
            } else {
                c.release(t);
            }
            assert_eq!(c.in_flight(t), after, "step {i}: {t}");
        }
        assert_eq!(c.tenants_in_flight(), 1, "only big holds requests; a and b left no entry");
    }

    #[test]
    fn without_a_limit_a_tenant_is_counted_but_never_refused() {
        let mut c = TenantCounts::new(TenantLimits::default());
        for n in 1..=1000 {
            c.acquire(ANONYMOUS).unwrap();
            assert_eq!(c.in_flight(ANONYMOUS), n);
        }
        for _ in 0..1000 {
            c.release(ANONYMOUS);
        }
        assert_eq!(c.tenants_in_flight(), 0);
    }

    #[test]
    fn a_permit_gives_its_slot_back_once_when_dropped() {
        let q = Quotas::new(TenantLimits { default: Some(2), overrides: BTreeMap::new() });
        let p1 = q.acquire("a").unwrap();
        let p2 = q.acquire("a").unwrap();
        assert_eq!(q.acquire("a").unwrap_err(), Refused { limit: 2 });
        let other = q.acquire("b").unwrap();
        drop(p1);
        assert_eq!(q.in_flight("a"), 1);
        let p3 = q.acquire("a").unwrap();
        assert!(q.acquire("a").is_err());
        // Permits move with their request, to another thread too, and still give back once.
        std::thread::spawn(move || drop((p2, p3))).join().unwrap();
        assert_eq!((q.in_flight("a"), q.in_flight("b")), (0, 1));
        drop(other);
        assert_eq!(q.in_flight("b"), 0);
        let again: Vec<_> = (0..2).map(|_| q.acquire("a").unwrap()).collect();
        assert!(q.acquire("a").is_err(), "exactly the limit again, no more: nothing was released twice");
        drop(again);
    }
}
