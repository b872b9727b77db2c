//! What the roles and the process shell share about one worker: who it is, its
//! engine, whether it takes new work (draining, fenced), the handlers and streams
//! in flight, the requests in the engine through `Prefill` or `Decode`, and the
//! ids cancelled recently (tombstones). Reservations are the decode role's own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_cluster::Role;
use tandem_engine::scheduler::RequestId;
use tandem_kvtransfer::KvLayout;
use tandem_proto::ids::ClusterRequestId;
use tandem_text::tokenizer::Tokenizer;
use tonic::Status;

use crate::actor::EngineHandle;

/// Longest lease a reservation gets by default, whatever the router asks
/// (`WorkerState::max_lease`, `--max-kv-lease`).
pub const MAX_LEASE: Duration = Duration::from_secs(60);
/// How long a cancelled request's id is remembered: its stream ends as CANCELLED, and a
/// second `Reserve` for it is refused. Only ids this worker holds get a tombstone, so a
/// `Cancel` of an id not yet used cannot refuse a later request; a `Reserve` that lands
/// after its router's `Cancel` is abandoned at the decode role's attach deadline instead.
const TOMBSTONE_TTL: Duration = Duration::from_secs(60);

/// What a worker's shared state is made of.
pub struct WorkerParts {
    pub id: String,
    pub role: Role,
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub layout: KvLayout,
    /// Longest lease a reservation or a prefill's transfer gets, whatever it asks.
    pub max_lease: Duration,
    /// Built with every role's parts: `SetRole` may change `role`.
    pub elastic: bool,
}

/// Everything the roles and the shell share.
pub struct WorkerState {
    pub id: String,
    /// The role served now (`Role::ALL`'s index): changed only by `SetRole` on an elastic
    /// worker.
    role: AtomicU8,
    pub elastic: bool,
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub layout: KvLayout,
    pub max_lease: Duration,
    pub draining: AtomicBool,
    /// The worker lost its discovery lease: it refuses new work until registered again.
    pub fenced: AtomicBool,
    /// Handlers and streams in progress (drain waits for none).
    pub inflight: AtomicUsize,
    /// `Prefill` calls in progress: prompts computed or their KV sent.
    pub prefills: AtomicUsize,
    /// A `SetRole` is draining the worker: it refuses new work meanwhile.
    pub changing_role: AtomicBool,
    /// Request ids cancelled recently, with when (see `TOMBSTONE_TTL`).
    cancelled: Mutex<HashMap<ClusterRequestId, Instant>>,
    /// Router ids of requests in the engine through `Prefill` or `Decode`.
    active: Mutex<HashMap<ClusterRequestId, RequestId>>,
}

impl WorkerState {
    pub fn new(p: WorkerParts) -> WorkerState {
        WorkerState {
            id: p.id,
            role: AtomicU8::new(role_index(p.role)),
            elastic: p.elastic,
            engine: p.engine,
            tokenizer: p.tokenizer,
            layout: p.layout,
            max_lease: p.max_lease,
            draining: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            prefills: AtomicUsize::new(0),
            changing_role: AtomicBool::new(false),
            cancelled: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
        }
    }

    /// The role the worker serves now.
    pub fn role(&self) -> Role {
        Role::ALL[self.role.load(Ordering::SeqCst) as usize]
    }

    /// Serves `role` from now on (`SetRole`, once the worker is drained).
    pub(crate) fn set_role(&self, role: Role) {
        self.role.store(role_index(role), Ordering::SeqCst);
    }

    /// Whether request `rid` was cancelled within `TOMBSTONE_TTL`.
    pub fn was_cancelled(&self, rid: ClusterRequestId) -> bool {
        self.cancelled.lock().expect("cancelled").get(&rid).is_some_and(|at| at.elapsed() < TOMBSTONE_TTL)
    }

    /// Remembers that `rid` was cancelled (and forgets tombstones past their time).
    pub fn bury(&self, rid: ClusterRequestId) {
        let mut c = self.cancelled.lock().expect("cancelled");
        c.retain(|_, at| at.elapsed() < TOMBSTONE_TTL);
        c.insert(rid, Instant::now());
    }

    /// The status a request that failed with `why` ends with: CANCELLED when a `Cancel`
    /// ended it, else `unavailable` (its worker failed it; the router may move it).
    pub fn failed_status(
        &self,
        rid: ClusterRequestId,
        why: String,
        unavailable: impl FnOnce(String) -> Status,
    ) -> Status {
        if self.was_cancelled(rid) {
            Status::cancelled(why)
        } else {
            unavailable(why)
        }
    }

    /// Refuses new work while draining or fenced.
    pub fn check_accepting(&self) -> Result<(), Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable(format!("worker {} is draining", self.id)));
        }
        if self.changing_role.load(Ordering::SeqCst) {
            return Err(Status::unavailable(format!(
                "worker {} is changing its role; it takes no new work until it has",
                self.id
            )));
        }
        if self.fenced.load(Ordering::SeqCst) {
            return Err(Status::unavailable(format!(
                "worker {} lost its discovery lease; it takes no new work until registered again",
                self.id
            )));
        }
        Ok(())
    }

    /// The engine request of router request `rid`, if it runs through `Prefill` or `Decode`.
    pub fn active(&self, rid: ClusterRequestId) -> Option<RequestId> {
        self.active.lock().expect("active").get(&rid).copied()
    }

    /// Requests in the engine through `Prefill` or `Decode`.
    pub fn active_ids(&self) -> Vec<RequestId> {
        self.active.lock().expect("active").values().copied().collect()
    }

    /// Counts `rid` (engine request `id`) as active while the returned guard lives; the
    /// guard aborts the request unless it is `finish`ed (client gone, handler dropped).
    pub fn track(self: &Arc<Self>, rid: ClusterRequestId, id: RequestId) -> Active {
        self.active.lock().expect("active").insert(rid, id);
        Active { state: self.clone(), rid, id, finished: false }
    }
}

fn role_index(role: Role) -> u8 {
    Role::ALL.iter().position(|&r| r == role).expect("every role is in ALL") as u8
}

/// Counts a handler or stream as in flight while it lives.
pub struct InFlight(Arc<WorkerState>);

impl InFlight {
    pub fn new(s: &Arc<WorkerState>) -> InFlight {
        s.inflight.fetch_add(1, Ordering::SeqCst);
        InFlight(s.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request in the engine through `Prefill` or `Decode` (`WorkerState::track`).
pub struct Active {
    state: Arc<WorkerState>,
    rid: ClusterRequestId,
    id: RequestId,
    finished: bool,
}

impl Active {
    /// The request ended (or its end is someone else's to make): dropping the guard no
    /// longer aborts it.
    pub fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.state.active.lock().expect("active").remove(&self.rid);
        if !self.finished {
            self.state.engine.abort(self.id, None);
        }
    }
}
