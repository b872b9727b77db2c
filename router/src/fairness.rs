//! The cluster's account of tenants' service, and the order requests wait in at the router.
//!
//! Workers count every tenant's weighted service (`StatsResponse.tenant_service`): prompt
//! tokens on prefill workers, generated tokens on decode workers. [`Ledger`] sums the
//! latest reports into one counter per tenant, plus a *lift*: a tenant that becomes active
//! at this router while others are is raised to the least counter among them, as virtual
//! token counters prescribe, so idleness is not banked. Each request's worker calls carry
//! the tenant's service elsewhere (the cluster's counter minus what that worker reported),
//! so a worker's `fair` queue orders by the whole account.
//!
//! The router's own queue is the wait for KV room (every decode worker full): there
//! [`RoomQueue`] wakes the waiter first in the router's `--scheduling-policy` order
//! (arrival, priority, the tenant's counter, or predicted length) rather than the one that
//! waited longest.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_cluster::WorkerId;
use tandem_proto::tandem::worker::v1 as pb;
use tokio::sync::Notify;

use crate::members::Members;
use crate::validate::Validated;

/// The default tenant's name on the wire and in the ledger (requests without an API key).
pub const DEFAULT_TENANT: &str = "";

#[derive(Debug, Default, Clone, Copy)]
struct Account {
    /// Requests of the tenant in flight at this router.
    active: usize,
    /// Raised on activation to the least active counter (never lowered).
    lift: f64,
}

/// Tenants' cluster-wide counters: what workers report, plus this router's lifts.
#[derive(Debug, Default)]
pub struct Ledger {
    accounts: Mutex<HashMap<String, Account>>,
}

/// What the ledger reads of one tenant: its service on each worker (latest reports).
pub type Reported = Vec<(WorkerId, f64)>;

impl Ledger {
    /// `tenant`'s counter given its `reported` service and its lift.
    fn counter(reported: &Reported, a: Option<&Account>) -> f64 {
        reported.iter().map(|(_, s)| s).sum::<f64>() + a.map_or(0.0, |a| a.lift)
    }

    /// A request of `tenant` starts at this router: a tenant with none in flight is lifted
    /// to the least counter among the tenants that have some. `report(t)` reads tenant
    /// `t`'s service on every worker.
    pub fn activate(&self, tenant: &str, report: &dyn Fn(&str) -> Reported) {
        let mut accounts = self.accounts.lock().expect("ledger");
        let was = accounts.get(tenant).copied().unwrap_or_default();
        if was.active == 0 {
            let floor = accounts
                .iter()
                .filter(|(t, a)| a.active > 0 && t.as_str() != tenant)
                .map(|(t, a)| Self::counter(&report(t), Some(a)))
                .min_by(f64::total_cmp);
            let own = Self::counter(&report(tenant), Some(&was));
            let a = accounts.entry(tenant.to_string()).or_default();
            if let Some(floor) = floor.filter(|f| *f > own) {
                a.lift += floor - own;
            }
        }
        accounts.entry(tenant.to_string()).or_default().active += 1;
    }

    /// A request of `tenant` ended at this router.
    pub fn deactivate(&self, tenant: &str) {
        if let Some(a) = self.accounts.lock().expect("ledger").get_mut(tenant) {
            a.active = a.active.saturating_sub(1);
        }
    }

    /// `tenant`'s cluster-wide counter.
    pub fn counter_of(&self, tenant: &str, reported: &Reported) -> f64 {
        Self::counter(reported, self.accounts.lock().expect("ledger").get(tenant))
    }

    /// `tenant`'s counter less what worker `on` reported of it: its service elsewhere.
    pub fn elsewhere(&self, tenant: &str, reported: &Reported, on: &WorkerId) -> f64 {
        let own: f64 = reported.iter().filter(|(w, _)| w == on).map(|(_, s)| s).sum();
        (self.counter_of(tenant, reported) - own).max(0.0)
    }
}

/// The tenant a request is counted under.
pub fn tenant_of(v: &Validated) -> &str {
    v.tenant.as_deref().unwrap_or(DEFAULT_TENANT)
}

/// What a worker call of `v` carries for the `fair` and `sjf` policies, sent to worker `on`.
pub fn scheduling(ledger: &Ledger, members: &Members, v: &Validated, on: &WorkerId) -> pb::Scheduling {
    let tenant = tenant_of(v);
    let reported = members.tenant_service(tenant);
    pb::Scheduling {
        tenant: tenant.to_string(),
        tenant_service_elsewhere: ledger.elsewhere(tenant, &reported, on),
        predicted_output_tokens: v.predicted_output.unwrap_or(0),
    }
}

/// Holds a tenant active in the ledger for a request's life.
pub struct Active {
    ledger: Arc<Ledger>,
    tenant: String,
}

impl Active {
    pub fn new(ledger: Arc<Ledger>, members: &Members, tenant: &str) -> Self {
        ledger.activate(tenant, &|t| members.tenant_service(t));
        Active { ledger, tenant: tenant.to_string() }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.ledger.deactivate(&self.tenant);
    }
}

/// The order of the router's queue: the same names as the workers' `--scheduling-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    Fcfs,
    Priority,
    Fair,
    Sjf,
}

impl Policy {
    pub const NAMES: [&'static str; 4] = ["fcfs", "priority", "fair", "sjf"];

    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "fcfs" => Some(Policy::Fcfs),
            "priority" => Some(Policy::Priority),
            "fair" => Some(Policy::Fair),
            "sjf" => Some(Policy::Sjf),
            _ => None,
        }
    }
}

/// Where a waiter stands: its policy key, then its arrival.
pub type QueueKey = (i64, u64);

/// A request's key in the router's queue under `policy`; `seq` is its place in arrival.
pub fn queue_key(policy: &Policy, ledger: &Ledger, members: &Members, v: &Validated, seq: u64) -> QueueKey {
    let k = match policy {
        Policy::Priority => v.priority as i64,
        Policy::Fair => {
            let t = tenant_of(v);
            (ledger.counter_of(t, &members.tenant_service(t)) * 1000.0) as i64
        }
        Policy::Sjf => v.predicted_output.unwrap_or(v.sampling.max_tokens) as i64,
        Policy::Fcfs => 0,
    };
    (k, seq)
}

/// The wait for KV room, in policy order: each waiter has its own `Notify`; an ending
/// attempt wakes the first in order, and only the first tries again when its poll passes.
#[derive(Debug, Default)]
pub struct RoomQueue {
    waiters: Mutex<BTreeMap<QueueKey, Arc<Notify>>>,
    seq: AtomicU64,
}

impl RoomQueue {
    /// A place in arrival order, kept by a choice across its waits.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Joins the queue at `key`; leaves it when the returned place is dropped.
    pub fn join(self: &Arc<Self>, key: QueueKey) -> Place {
        let n = Arc::new(Notify::new());
        self.waiters.lock().expect("room queue").insert(key, n.clone());
        Place { queue: self.clone(), key, notify: n }
    }

    /// Wakes the first waiter in order (one: each try costs a `Reserve`).
    pub fn wake_first(&self) {
        if let Some((_, n)) = self.waiters.lock().expect("room queue").iter().next() {
            n.notify_one();
        }
    }

    pub fn len(&self) -> usize {
        self.waiters.lock().expect("room queue").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A waiter's place in the [`RoomQueue`].
pub struct Place {
    queue: Arc<RoomQueue>,
    key: QueueKey,
    notify: Arc<Notify>,
}

impl Place {
    /// Woken (by `wake_first`) or not, returns when notified.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Whether no waiter is before this one.
    pub fn is_first(&self) -> bool {
        self.queue.waiters.lock().expect("room queue").keys().next() == Some(&self.key)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        // Nobody is woken here: a waiter that leaves to try again and finds no room would
        // wake the next, which would wake it back, each costing a `Reserve`. The next in
        // order tries at its own poll, or when an attempt ends.
        self.queue.waiters.lock().expect("room queue").remove(&self.key);
    }
}
