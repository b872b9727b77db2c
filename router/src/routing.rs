//! What every choice of every request shares: where the workers are and how to pick them
//! ([`Routing`]), how a choice recovers (migration limit, KV failure policy, lease), and
//! the wait for KV room when every decode worker is full (a `Notify` each ending attempt
//! rings, and the count of choices waiting). `choice` runs choices over it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::fairness::{Ledger, Policy as QueuePolicy, RoomQueue};
use crate::members::Members;
use crate::metrics;
use crate::placement::{PlacementConfig, PlacementControl};
use crate::policy::RoutingPolicy;
use crate::predict::LengthPredictor;
use crate::recovery::KvFailurePolicy;
use crate::slo::{SloAdmission, TtftModel};

/// How long a decode worker holds a prompt's blocks for KV that does not come, by default.
pub const KV_LEASE: Duration = Duration::from_secs(30);
/// How long a choice waits for KV room when every decode worker's pool is full.
pub const KV_WAIT: Duration = Duration::from_secs(30);

/// What every choice shares: where the workers are and how to pick them, how a choice
/// recovers, and the wait for KV room.
pub struct Routing {
    /// Every served model's workers: a choice is placed among its own model's only
    /// (`Validated::model`).
    pub members: Arc<Members>,
    pub policy: Box<dyn RoutingPolicy>,
    /// Per request, whether a decode worker that can prefill does (`placement`).
    pub placement: Arc<PlacementControl>,
    /// Times a choice may move to other workers after a worker fails under it.
    pub migration_limit: usize,
    /// Carry out a worker's ask to move a request by moving its KV (`live`); off: a leaving
    /// worker's requests are recomputed elsewhere, the others stay.
    pub live_migration: bool,
    /// What a request whose KV transfer fails gets when it does not choose.
    pub kv_failure_policy: KvFailurePolicy,
    /// The lease of a reservation (see `KV_LEASE`).
    pub kv_lease: Duration,
    /// How long a choice waits for a decode worker with room (see `KV_WAIT`); zero: refuse
    /// at once.
    pub kv_wait: Duration,
    /// Notified whenever a choice's attempt ends (its blocks are being freed): one choice
    /// waiting for KV room tries again.
    pub kv_room: Notify,
    /// Choices waiting for KV room now.
    pub kv_waiting: AtomicUsize,
    /// The order choices wait for KV room in (`fairness::RoomQueue`): the router's
    /// `--scheduling-policy`.
    pub room: Arc<RoomQueue>,
    pub queue_policy: QueuePolicy,
    /// Tenants' cluster-wide service (`fairness::Ledger`).
    pub ledger: Arc<Ledger>,
    /// Which requests are refused when predicted to miss their TTFT objective (`slo`).
    pub slo_admission: SloAdmission,
    /// What TTFT predictions add beyond the queue (`slo::TtftModel`).
    pub ttft: TtftModel,
    /// Predicts each request's output length (`predict`); `None`: no prediction.
    pub predictor: Option<Arc<LengthPredictor>>,
}

impl Routing {
    pub fn new(members: Arc<Members>, policy: Box<dyn RoutingPolicy>) -> Self {
        Routing {
            members,
            policy,
            placement: Arc::new(PlacementControl::new(PlacementConfig::default())),
            migration_limit: 3,
            live_migration: true,
            kv_failure_policy: KvFailurePolicy::Retry,
            kv_lease: KV_LEASE,
            kv_wait: KV_WAIT,
            kv_room: Notify::new(),
            kv_waiting: AtomicUsize::new(0),
            room: Arc::default(),
            queue_policy: QueuePolicy::Fcfs,
            ledger: Arc::default(),
            slo_admission: SloAdmission::default(),
            ttft: TtftModel::default(),
            predictor: None,
        }
    }
}

/// A choice between two looks for KV room (counted in `Routing::kv_waiting` while it
/// lives, so a choice dropped mid-wait is uncounted too).
pub(crate) struct WaitingForRoom(Arc<Routing>);

impl WaitingForRoom {
    pub(crate) fn new(r: &Arc<Routing>) -> Self {
        let n = r.kv_waiting.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::set_waiting_for_room(n);
        WaitingForRoom(r.clone())
    }
}

impl Drop for WaitingForRoom {
    fn drop(&mut self) {
        let n = self.0.kv_waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics::set_waiting_for_room(n);
    }
}
