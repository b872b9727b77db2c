//! The decode role's reservations: blocks held for a prompt whose KV a prefill
//! worker is sending, from `Reserve` until the request is handed to its stream
//! or ends without it.
//!
//! Every reservation lives in one map entry and moves through these states, each
//! transition a method of [`Reservations`], taken under the map's lock:
//!
//! ```text
//! reserve ─► Waiting ──kv_outcome(ok)──────► Arrived ──attach──► the stream owns it
//!              │  │                             │
//!              │  └─kv_outcome(err|wrong size)─► Ended (engine failed/aborted)
//!              │                                │
//!              └─ cancel | expire (attach deadline) | stream gone ─► removed
//! ```
//!
//! The invariant: every reservation ends in exactly one of {KV arrived (handed to a
//! stream, or abandoned at the attach deadline), cancelled, expired, failed}, and
//! each ending frees its engine request exactly once: at once when nothing can be
//! writing its blocks (the KV arrived whole, or the engine already dropped it), else
//! after the quarantine ([`QUARANTINE`], then until no admitted write is landing).
//! An entry that leaves the map while `Waiting` always schedules that release; an
//! `Arrived` one is aborted (or its stream ends it); an `Ended` one is not freed
//! again (its abort was sent, or its release scheduled, when it ended). A transfer
//! outcome that finds its entry gone or replaced is ignored: whoever removed it
//! owned the ending. The engine request is the role's from `Admitted::claim`, just
//! before `insert`; a `Reserve` call that goes away before that never gets here, and
//! the engine aborts the request nobody claimed.
//!
//! Every task this type spawns (one watcher per reservation: the transfer's outcome
//! and the attach deadline; one release per quarantine) is kept in a `JoinSet` that
//! `shutdown` aborts. The stream of an attached request is not here (`stream`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tandem_engine::scheduler::RequestId;
use tandem_kvtransfer::{Arrived, KvReceiver, TransferError};
use tandem_proto::ids::ClusterRequestId;
use tandem_worker_runtime::{EngineHandle, Event};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tonic::Status;

/// How long the blocks of a request whose KV never completed stay out of use after its
/// reservation ends: a same-host sender copies into shared memory before it sends the
/// frame that names the blocks, so a copy may still be landing.
pub const QUARANTINE: Duration = Duration::from_millis(500);
/// Longest wait for a stalled sender's admitted frame to finish landing (a sender stalled
/// longer than that has its frame refused by the checksum at worst, since the blocks are
/// not read meanwhile).
const MAX_WRITE_WAIT: Duration = Duration::from_secs(60);
/// A reservation whose `Decode` stream does not attach within this (the router opens it
/// right after `Reserve`) is abandoned: its router went away.
pub const ATTACH_DEADLINE: Duration = Duration::from_secs(5);

/// What a reservation asks of the engine: the `EngineHandle` in a worker, a fake in tests.
pub trait RemoteEngine: Send + Sync {
    /// The KV arrived whole: the request joins the running batch.
    fn remote_ready(&self, id: RequestId, first_token: u32);
    /// Frees the request's blocks at once (its channel gets `Failed(reason)` first).
    fn abort(&self, id: RequestId, reason: Option<String>);
    /// Tells the request's stream it failed, keeping its blocks until `abort`.
    fn fail(&self, id: RequestId, reason: String);
}

impl RemoteEngine for EngineHandle {
    fn remote_ready(&self, id: RequestId, first_token: u32) {
        EngineHandle::remote_ready(self, id, first_token)
    }
    fn abort(&self, id: RequestId, reason: Option<String>) {
        EngineHandle::abort(self, id, reason)
    }
    fn fail(&self, id: RequestId, reason: String) {
        EngineHandle::fail(self, id, reason)
    }
}

/// Writes into a request's blocks still landing: the `KvReceiver` in a worker.
pub trait Landing: Send + Sync {
    fn writes_in_progress(&self, rid: ClusterRequestId) -> usize;
}

impl Landing for KvReceiver {
    fn writes_in_progress(&self, rid: ClusterRequestId) -> usize {
        KvReceiver::writes_in_progress(self, rid)
    }
}

/// How a reservation's transfer ends, as the receiver reports it (`Reservation::wait`).
/// Dropping it gives the receiver's reservation up (no frame is admitted after).
pub type KvOutcome = Pin<Box<dyn Future<Output = Result<Arrived, TransferError>> + Send>>;

/// The clocks of a reservation's life.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub quarantine: Duration,
    pub max_write_wait: Duration,
    pub attach_deadline: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { quarantine: QUARANTINE, max_write_wait: MAX_WRITE_WAIT, attach_deadline: ATTACH_DEADLINE }
    }
}

/// A reservation to hold: the engine request admitted for it (and claimed), and the
/// receiver's reservation of its blocks.
pub struct NewReservation {
    /// The router's request id.
    pub rid: ClusterRequestId,
    pub id: RequestId,
    /// The prompt's blocks, cached ones included (what a `Cancel` reports freed).
    pub blocks: usize,
    pub prompt_len: usize,
    /// Bytes the transfer brings (for the metrics).
    pub kv_bytes: u64,
    pub events: mpsc::UnboundedReceiver<Event>,
    /// The lease granted: a stream attaching later than `min(lease, attach deadline)` finds
    /// the reservation abandoned.
    pub lease: Duration,
    /// Live migration's pre-copy: no stream attaches; the reservation ends when its KV has
    /// arrived (into the prefix cache) or at its lease.
    pub cache_only: bool,
}

/// A reservation handed to its `Decode` stream.
pub struct Attached {
    pub id: RequestId,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub reserved_at: Instant,
    /// When the KV arrived, once it has.
    pub arrived: Arc<OnceLock<Instant>>,
}

/// Where a reservation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kv {
    /// Its blocks are reserved; a transfer may be writing them.
    Waiting,
    /// Its KV arrived whole: the engine runs it.
    Arrived,
    /// It ended without its KV (the transfer failed, or brought KV of the wrong size): its
    /// engine request is freed, or will be after the quarantine.
    Ended,
}

struct Entry {
    id: RequestId,
    blocks: usize,
    prompt_len: usize,
    kv_bytes: u64,
    /// Until a `Decode` stream attaches.
    events: Option<mpsc::UnboundedReceiver<Event>>,
    kv: Kv,
    reserved_at: Instant,
    arrived: Arc<OnceLock<Instant>>,
    /// The reservation's watcher (its transfer and its attach deadline).
    watcher: AbortHandle,
    /// See `NewReservation::cache_only`.
    cache_only: bool,
}

/// The reservations of one decode worker; cheap to clone.
#[derive(Clone)]
pub struct Reservations {
    inner: Arc<Inner>,
}

struct Inner {
    /// The worker's id (metrics).
    worker: String,
    engine: Arc<dyn RemoteEngine>,
    landing: Arc<dyn Landing>,
    timing: Timing,
    map: Mutex<HashMap<ClusterRequestId, Entry>>,
    /// Watchers and quarantine releases. Lock order: `map`, then `tasks`.
    tasks: Mutex<JoinSet<()>>,
}

impl Reservations {
    pub fn new(
        worker: String,
        engine: Arc<dyn RemoteEngine>,
        landing: Arc<dyn Landing>,
        timing: Timing,
    ) -> Reservations {
        let inner = Inner { worker, engine, landing, timing, map: Mutex::default(), tasks: Mutex::default() };
        Reservations { inner: Arc::new(inner) }
    }

    /// Holds `new` until it ends; `kv` resolves when its transfer does.
    pub fn insert(&self, new: NewReservation, kv: KvOutcome) {
        // A cache-only reservation has no stream to wait for: it lives as long as its lease.
        let attach = if new.cache_only { new.lease } else { self.inner.timing.attach_deadline.min(new.lease) };
        let attach_by = tokio::time::Instant::now() + attach;
        let mut map = self.inner.map.lock().expect("reservations");
        // The watcher takes the map's lock before it acts: it sees the entry.
        let watcher = self.spawn(watch(self.clone(), new.rid, new.id, kv, attach_by));
        let entry = Entry {
            id: new.id,
            blocks: new.blocks,
            prompt_len: new.prompt_len,
            kv_bytes: new.kv_bytes,
            events: Some(new.events),
            kv: Kv::Waiting,
            reserved_at: Instant::now(),
            arrived: Arc::new(OnceLock::new()),
            watcher,
            cache_only: new.cache_only,
        };
        if let Some(old) = map.insert(new.rid, entry) {
            // The receiver refuses a second live reservation of an id, so only an entry whose
            // transfer is over can be here; it ends now, as if cancelled.
            self.end(new.rid, old, None);
        }
    }

    /// Whether `rid` holds a reservation.
    pub fn contains(&self, rid: ClusterRequestId) -> bool {
        self.inner.map.lock().expect("reservations").contains_key(&rid)
    }

    /// Router ids of the reservations held.
    pub fn ids(&self) -> Vec<ClusterRequestId> {
        self.inner.map.lock().expect("reservations").keys().copied().collect()
    }

    /// Hands reservation `rid` to its `Decode` stream. `None`: nothing is reserved for it.
    pub fn attach(&self, rid: ClusterRequestId) -> Result<Option<Attached>, Status> {
        let mut map = self.inner.map.lock().expect("reservations");
        let Some(e) = map.get_mut(&rid) else { return Ok(None) };
        let Some(events) = e.events.take() else {
            return Err(Status::already_exists(format!("request {rid} is already attached")));
        };
        Ok(Some(Attached { id: e.id, events, reserved_at: e.reserved_at, arrived: e.arrived.clone() }))
    }

    /// Ends reservation `rid` (a `Cancel`, a drain, a stream whose client left): the
    /// receiver's reservation goes first (no frame is admitted for it after this), then
    /// the engine request is freed (see `end`). Returns the blocks it held.
    pub fn cancel(&self, rid: ClusterRequestId, reason: Option<String>) -> Option<usize> {
        let e = self.inner.map.lock().expect("reservations").remove(&rid)?;
        e.watcher.abort();
        let blocks = e.blocks;
        self.end(rid, e, reason);
        Some(blocks)
    }

    /// The stream of request `id` ended (finished, or failed): its reservation is done.
    pub fn stream_ended(&self, rid: ClusterRequestId, id: RequestId) {
        if let Some(e) = self.take(rid, id) {
            e.watcher.abort();
            if e.kv == Kv::Waiting {
                // The engine failed it on its own (a failed step, a shutdown); the receiver's
                // reservation is given up, and whatever still lands is waited out.
                self.release_after_quarantine(rid, e.id);
            }
        }
    }

    /// The stream of request `id` went away before its end (its client left): the request
    /// ends, through its reservation if it still has one.
    pub fn stream_dropped(&self, rid: ClusterRequestId, id: RequestId) {
        match self.take(rid, id) {
            Some(e) => {
                e.watcher.abort();
                self.end(rid, e, None);
            }
            None => self.inner.engine.abort(id, None),
        }
    }

    /// Stops every watcher and pending release (a worker's shutdown: the engine, which
    /// frees everything, stops with it).
    pub fn shutdown(&self) {
        self.inner.tasks.lock().expect("tasks").abort_all();
    }

    /// Removes reservation `rid` if it is request `id`'s.
    fn take(&self, rid: ClusterRequestId, id: RequestId) -> Option<Entry> {
        let mut map = self.inner.map.lock().expect("reservations");
        if map.get(&rid).is_some_and(|e| e.id == id) {
            map.remove(&rid)
        } else {
            None
        }
    }

    /// Frees the engine request of a removed entry, once: at once if its KV had arrived,
    /// after the quarantine if a transfer may still be writing its blocks, not at all if it
    /// had ended already (freed then, or its release is pending).
    fn end(&self, rid: ClusterRequestId, e: Entry, reason: Option<String>) {
        match e.kv {
            Kv::Arrived => self.inner.engine.abort(e.id, reason),
            Kv::Waiting => {
                if let Some(why) = reason {
                    self.inner.engine.fail(e.id, why);
                }
                self.release_after_quarantine(rid, e.id);
            }
            Kv::Ended => {}
        }
    }

    /// The transfer of reservation `rid` (request `id`) ended. Returns whether the watcher
    /// still has an attach deadline to keep.
    fn kv_outcome(&self, rid: ClusterRequestId, id: RequestId, outcome: Result<Arrived, TransferError>) -> bool {
        let inner = &self.inner;
        let mut map = inner.map.lock().expect("reservations");
        let Some(e) = map.get_mut(&rid).filter(|e| e.id == id && e.kv == Kv::Waiting) else {
            // Cancelled meanwhile: the canceller owned the ending.
            return false;
        };
        match outcome {
            Ok(a) if a.num_tokens as usize == e.prompt_len => {
                e.kv = Kv::Arrived;
                let _ = e.arrived.set(Instant::now());
                tandem_worker_runtime::metrics::kv_session(&inner.worker, "received", e.kv_bytes, None);
                inner.engine.remote_ready(id, a.first_token);
                if e.cache_only {
                    // Its blocks go into the prefix cache and the engine ends it: done.
                    map.remove(&rid);
                    return false;
                }
            }
            Ok(a) => {
                e.kv = Kv::Ended;
                let why = format!("KV for {} tokens arrived for a prompt of {}", a.num_tokens, e.prompt_len);
                inner.engine.abort(id, Some(why));
            }
            Err(err) => {
                e.kv = Kv::Ended;
                tandem_worker_runtime::metrics::kv_session(&inner.worker, "received", 0, Some(err.kind()));
                // The transfer failed or its lease ended: the sender may still be writing.
                // Tell the client now; free the blocks when it is safe.
                inner.engine.fail(id, format!("KV transfer failed: {err}"));
                self.release_after_quarantine(rid, id);
            }
        }
        e.events.is_some()
    }

    /// No stream attached to reservation `rid` (request `id`) in time: its router went
    /// away. It ends as if cancelled. Returns whether it ended (false: a stream holds it,
    /// or it had ended already).
    fn expire(&self, rid: ClusterRequestId, id: RequestId) -> bool {
        let mut map = self.inner.map.lock().expect("reservations");
        if !map.get(&rid).is_some_and(|e| e.id == id && e.events.is_some()) {
            return map.get(&rid).is_none_or(|e| e.id != id);
        }
        let e = map.remove(&rid).expect("checked above");
        drop(map);
        // The caller is the watcher itself: it returns (and gives the receiver's reservation
        // up) right after.
        self.end(rid, e, None);
        true
    }

    /// Frees request `id`'s blocks once no write into them can still be in flight: after
    /// the quarantine, and after every admitted frame for it has been read.
    fn release_after_quarantine(&self, rid: ClusterRequestId, id: RequestId) {
        let me = self.clone();
        self.spawn(async move {
            let Timing { quarantine, max_write_wait, .. } = me.inner.timing;
            tokio::time::sleep(quarantine).await;
            let end = tokio::time::Instant::now() + max_write_wait;
            while me.inner.landing.writes_in_progress(rid) > 0 && tokio::time::Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            me.inner.engine.abort(id, None);
            // A reservation nobody attached to is forgotten with its blocks.
            let mut map = me.inner.map.lock().expect("reservations");
            if map.get(&rid).is_some_and(|e| e.id == id && e.events.is_some()) {
                if let Some(e) = map.remove(&rid) {
                    e.watcher.abort();
                }
            }
        });
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> AbortHandle {
        let mut tasks = self.inner.tasks.lock().expect("tasks");
        // Reap what has finished, so the set holds only live tasks.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task)
    }
}

/// A reservation's watcher: waits for its transfer's outcome and, until a stream
/// attaches, for its attach deadline. Returning drops `kv`, which gives the receiver's
/// reservation up: it returns once the outcome is known and a stream holds the request,
/// or once the reservation has ended.
async fn watch(r: Reservations, rid: ClusterRequestId, id: RequestId, kv: KvOutcome, attach_by: tokio::time::Instant) {
    let mut kv = Some(kv);
    let deadline = tokio::time::sleep_until(attach_by);
    tokio::pin!(deadline);
    let mut attach_pending = true;
    loop {
        let outcome = tokio::select! {
            outcome = async { kv.as_mut().expect("guarded").await }, if kv.is_some() => Some(outcome),
            _ = &mut deadline, if attach_pending => None,
        };
        match outcome {
            Some(outcome) => {
                kv = None;
                if !r.kv_outcome(rid, id, outcome) {
                    return;
                }
            }
            None => {
                attach_pending = false;
                if r.expire(rid, id) || kv.is_none() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
