//! The `tandem.worker.v1.Worker` service: one implementation for every role.
//!
//! A decode worker reserves blocks for a prompt (`Reserve`), receives its KV
//! in place from a prefill worker, and streams the generation (`Decode`). A
//! prefill worker computes a prompt and ships its KV while computing
//! (`Prefill`). A worker of role `both` does either, and generates a whole
//! request locally when the router has no prefill worker to send it to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_cluster::Role;
use tandem_engine::error::EngineError;
use tandem_engine::kv_cache::BlockId;
use tandem_engine::llm_engine::EngineRequest;
use tandem_engine::scheduler::RequestId;
use tandem_kvtransfer::{KvLayout, KvReceiver, KvSender};
use tandem_prefill_worker::{start_export, Admission, EngineHandle, Event};
use tandem_proto::ids::{ClusterRequestId, LeaseId};
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_server::Worker;
use tandem_text::tokenizer::Tokenizer;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::convert::{finish_to_pb, layout_from_pb, layout_to_pb, logprobs_to_pb, sampling_from_pb};

/// Longest lease a reservation gets by default, whatever the router asks
/// (`WorkerState::max_lease`, `--max-kv-lease`).
pub const MAX_LEASE: Duration = Duration::from_secs(60);
/// How long a `Prefill` naming a destination this worker's view of discovery does not
/// hold yet waits for the view to catch up (the router may have seen it join first).
const PEER_WAIT: Duration = Duration::from_secs(2);

/// How long the blocks of a request whose KV never completed stay out of use after its
/// reservation ends: a same-host sender copies into shared memory before it sends the
/// frame that names the blocks, so a copy may still be landing.
const QUARANTINE: Duration = Duration::from_millis(500);
/// Longest wait for a stalled sender's admitted frame to finish landing.
const MAX_WRITE_WAIT: Duration = Duration::from_secs(60);
/// A reservation whose `Decode` stream does not attach within this (the router opens it
/// right after `Reserve`) is abandoned: its router went away.
pub const ATTACH_DEADLINE: Duration = Duration::from_secs(5);
/// How long a cancelled request's id is remembered: its stream ends as CANCELLED, and a
/// second `Reserve` for it is refused. Only ids this worker holds get a tombstone, so a
/// `Cancel` of an id not yet used cannot refuse a later request; a `Reserve` that lands
/// after its router's `Cancel` is abandoned at `ATTACH_DEADLINE` instead.
const TOMBSTONE_TTL: Duration = Duration::from_secs(60);

/// A reservation whose `Decode` call has not attached yet.
struct Reserved {
    id: RequestId,
    blocks: usize,
    events: Option<mpsc::UnboundedReceiver<Event>>,
    /// Waits for the KV, then starts the decode; aborting it drops the reservation.
    watcher: JoinHandle<()>,
    reserved_at: Instant,
    kv_arrived: Arc<Mutex<Option<Instant>>>,
}

/// Everything the service's handlers share.
pub struct WorkerState {
    pub id: String,
    pub role: Role,
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub layout: KvLayout,
    /// Decode-capable workers: where KV arrives.
    pub receiver: Option<Arc<KvReceiver>>,
    pub kv_endpoints: Option<pb::KvEndpoints>,
    /// Prefill-capable workers: where KV leaves.
    pub sender: Option<Arc<KvSender>>,
    reserved: Mutex<HashMap<u64, Reserved>>,
    /// Request ids cancelled recently, with when (see `TOMBSTONE_TTL`).
    cancelled: Mutex<HashMap<u64, Instant>>,
    /// Router ids of requests in the engine through `Prefill` or `Decode`.
    active: Mutex<HashMap<u64, RequestId>>,
    pub draining: AtomicBool,
    /// The worker lost its discovery lease: it refuses new work until registered again.
    pub fenced: AtomicBool,
    /// Handlers and streams in progress (drain waits for none).
    pub inflight: AtomicUsize,
    /// Longest lease a reservation or a prefill's transfer gets, whatever it asks.
    pub max_lease: Duration,
    /// The cluster's workers as discovery lists them (prefill-capable workers with
    /// discovery): a `Prefill` sends KV only to a decode worker listed here, at the
    /// endpoints it registered. `None`: no check (a worker without discovery).
    pub peers: Option<crate::peers::Peers>,
}

impl WorkerState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        role: Role,
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
        layout: KvLayout,
        receiver: Option<Arc<KvReceiver>>,
        kv_endpoints: Option<pb::KvEndpoints>,
        sender: Option<Arc<KvSender>>,
    ) -> WorkerState {
        WorkerState {
            id,
            role,
            engine,
            tokenizer,
            layout,
            receiver,
            kv_endpoints,
            sender,
            reserved: Mutex::new(HashMap::new()),
            cancelled: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            max_lease: MAX_LEASE,
            peers: None,
        }
    }

    /// Requests this worker still holds: reserved, prefilling or decoding.
    pub fn outstanding(&self) -> usize {
        self.reserved.lock().expect("reserved").len() + self.active.lock().expect("active").len()
    }

    /// Ends every request this worker holds (a drain past its deadline); returns how many.
    pub fn abort_all(self: &Arc<Self>, reason: &str) -> usize {
        let reserved: Vec<u64> = self.reserved.lock().expect("reserved").keys().copied().collect();
        let active: Vec<RequestId> = self.active.lock().expect("active").values().copied().collect();
        for rid in &reserved {
            self.cancel_reserved(*rid, Some(reason.to_string()));
        }
        for id in &active {
            self.engine.abort(*id, Some(reason.to_string()));
        }
        reserved.len() + active.len()
    }

    /// Whether request `rid` was cancelled within `TOMBSTONE_TTL`.
    fn was_cancelled(&self, rid: u64) -> bool {
        self.cancelled.lock().expect("cancelled").get(&rid).is_some_and(|at| at.elapsed() < TOMBSTONE_TTL)
    }

    /// The status a request that failed with `why` ends with: CANCELLED when a `Cancel`
    /// ended it, else `unavailable` (its worker failed it; the router may move it).
    fn failed_status(&self, rid: u64, why: String, unavailable: impl FnOnce(String) -> Status) -> Status {
        if self.was_cancelled(rid) {
            Status::cancelled(why)
        } else {
            unavailable(why)
        }
    }

    fn check_accepting(&self) -> Result<(), Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable(format!("worker {} is draining", self.id)));
        }
        if self.fenced.load(Ordering::SeqCst) {
            return Err(Status::unavailable(format!(
                "worker {} lost its discovery lease; it takes no new work until registered again",
                self.id
            )));
        }
        Ok(())
    }

    /// Ends reserved request `rid`: the reservation goes first (no frame is admitted for
    /// it after this), then its blocks are freed: at once if its KV had arrived, else once
    /// nothing can still be writing them (`release_later`).
    fn cancel_reserved(self: &Arc<Self>, rid: u64, reason: Option<String>) -> Option<usize> {
        let r = self.reserved.lock().expect("reserved").remove(&rid)?;
        r.watcher.abort();
        if r.kv_arrived.lock().expect("arrived").is_some() {
            self.engine.abort(r.id, reason);
        } else {
            if let Some(why) = reason {
                self.engine.fail(r.id, why);
            }
            tokio::spawn(release_later(self.clone(), r.id, rid));
        }
        Some(r.blocks)
    }
}

/// Frees the blocks of a request whose KV transfer did not complete, once no write into
/// them can still be in flight: after the quarantine, and after every admitted frame for
/// it has been read (bounded by `MAX_WRITE_WAIT`; a sender stalled longer than that has
/// its frame refused by the checksum at worst, since the blocks are not read meanwhile).
async fn release_later(state: Arc<WorkerState>, id: RequestId, rid: u64) {
    tokio::time::sleep(QUARANTINE).await;
    if let Some(rx) = &state.receiver {
        let end = Instant::now() + MAX_WRITE_WAIT;
        while rx.writes_in_progress(ClusterRequestId(rid)) > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    state.engine.abort(id, None);
    // A reservation nobody attached to is forgotten with its blocks.
    let mut reserved = state.reserved.lock().expect("reserved");
    if reserved.get(&rid).is_some_and(|r| r.id == id && r.events.is_some()) {
        reserved.remove(&rid);
    }
}

/// Marks a status as caused by a failed KV transfer (the router's KV failure policy then
/// decides what the request gets), as opposed to a failed worker.
pub fn kv_fault(mut status: Status) -> Status {
    status.metadata_mut().insert(tandem_proto::FAULT_METADATA, tonic::metadata::MetadataValue::from_static("kv"));
    status
}

pub fn status_from_engine(e: EngineError) -> Status {
    match e {
        EngineError::InvalidRequest(m) => Status::invalid_argument(m),
        EngineError::Overloaded(m) => Status::resource_exhausted(m),
        EngineError::OutOfBlocks(m) => Status::resource_exhausted(format!("out of KV cache blocks: {m}")),
        other => Status::internal(other.to_string()),
    }
}

/// Counts a handler or stream as in flight while it lives.
struct InFlight(Arc<WorkerState>);

impl InFlight {
    fn new(s: &Arc<WorkerState>) -> InFlight {
        s.inflight.fetch_add(1, Ordering::SeqCst);
        InFlight(s.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Cancels a request in the engine unless it finished (client gone, handler dropped).
struct RequestGuard {
    state: Arc<WorkerState>,
    rid: u64,
    id: RequestId,
    done: bool,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.state.active.lock().expect("active").remove(&self.rid);
        if !self.done && self.state.cancel_reserved(self.rid, None).is_none() {
            self.state.engine.abort(self.id, None);
        }
    }
}

#[derive(Clone)]
pub struct WorkerService(pub Arc<WorkerState>);

type DecodeStream = ReceiverStream<Result<pb::DecodeResponse, Status>>;

impl WorkerService {
    /// Streams a request's engine events as `DecodeResponse`s until it finishes or the
    /// client goes away (which cancels it).
    fn stream_events(
        &self,
        rid: u64,
        id: RequestId,
        mut events: mpsc::UnboundedReceiver<Event>,
        timing: Option<(Instant, Arc<Mutex<Option<Instant>>>)>,
    ) -> DecodeStream {
        let (tx, rx) = mpsc::channel(64);
        let state = self.0.clone();
        self.0.active.lock().expect("active").insert(rid, id);
        tokio::spawn(async move {
            let _inflight = InFlight::new(&state);
            let mut guard = RequestGuard { state: state.clone(), rid, id, done: false };
            let started = Instant::now();
            let mut first_at = None;
            loop {
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    _ = tx.closed() => break,
                };
                let msg = match ev {
                    Some(Event::Output(o)) => {
                        let first = *first_at.get_or_insert_with(Instant::now);
                        let finished = o.finish.is_some();
                        let tok = &state.tokenizer;
                        let timing = finished.then(|| {
                            let ms = |d: Duration| d.as_secs_f64() * 1e3;
                            let (kv_wait, queue) = match &timing {
                                Some((reserved_at, arrived)) => {
                                    let arrived = arrived.lock().expect("arrived").unwrap_or(first);
                                    (ms(arrived - *reserved_at), ms(first.saturating_duration_since(arrived)))
                                }
                                None => (0.0, ms(first - started)),
                            };
                            pb::DecodeTiming {
                                kv_wait_time_ms: kv_wait,
                                queue_time_ms: queue,
                                decode_time_ms: ms(first.elapsed()),
                            }
                        });
                        let resp = pb::DecodeResponse {
                            token_ids: o.token_ids.clone(),
                            text: o.text.clone(),
                            logprobs: o.logprobs.iter().map(|t| logprobs_to_pb(tok, t)).collect(),
                            finish_reason: finish_to_pb(o.finish) as i32,
                            timing,
                            prompt_logprobs: o.prompt_logprobs.iter().map(|t| logprobs_to_pb(tok, t)).collect(),
                            cached_tokens: o.cached_tokens as u32,
                        };
                        if finished {
                            guard.done = true;
                            state.reserved.lock().expect("reserved").remove(&rid);
                        }
                        Ok(resp)
                    }
                    Some(Event::Failed(why)) => {
                        guard.done = true;
                        state.reserved.lock().expect("reserved").remove(&rid);
                        let kv_missing =
                            timing.as_ref().is_some_and(|(_, arrived)| arrived.lock().expect("arrived").is_none());
                        Err(state.failed_status(rid, why, |why| {
                            if kv_missing {
                                kv_fault(Status::unavailable(why))
                            } else {
                                Status::unavailable(why)
                            }
                        }))
                    }
                    None => Err(Status::internal("the engine dropped the request")),
                };
                let end = msg.is_err() || guard.done;
                if tx.send(msg).await.is_err() || end {
                    break;
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn reserve(&self, req: Request<pb::ReserveRequest>) -> Result<Response<pb::ReserveResponse>, Status> {
        let s = &self.0;
        let _inflight = InFlight::new(s);
        s.check_accepting()?;
        let (Some(receiver), true) = (&s.receiver, s.role.can_decode()) else {
            return Err(Status::failed_precondition(format!("worker {} ({}) does not decode", s.id, s.role)));
        };
        let r = req.into_inner();
        if s.reserved.lock().expect("reserved").contains_key(&r.request_id) {
            return Err(Status::already_exists(format!("request {} is already reserved", r.request_id)));
        }
        if s.was_cancelled(r.request_id) {
            return Err(Status::cancelled(format!("request {} was cancelled", r.request_id)));
        }
        let mut params = sampling_from_pb(&r.sampling.unwrap_or_default());
        // The prefill worker computes (and scores) the prompt; this side never does.
        params.prompt_logprobs = None;
        let prompt_len = r.prompt_token_ids.len();
        let ereq = EngineRequest {
            prompt: r.prompt_token_ids,
            params,
            n: 1,
            priority: r.priority,
            cache_salt: r.cache_salt,
            export_kv: false,
            resumed: r.resumed_tokens as usize,
        };
        let admitted = s.engine.submit(ereq, Admission::Remote).await.map_err(status_from_engine)?;
        let lease = Duration::from_millis(r.lease_ms.max(1) as u64).min(s.max_lease);
        let deadline = tokio::time::Instant::now() + lease;
        let blocks: Vec<u32> = BlockId::as_u32s(&admitted.blocks).to_vec();
        // Leading blocks this worker's prefix cache holds are not sent: only the rest is
        // reserved for the transfer.
        let cached = admitted.cached_blocks.min(blocks.len());
        let (rid, from) = (ClusterRequestId(r.request_id), LeaseId::from_wire(r.sender_lease));
        let reservation = match receiver.reserve_from(rid, &admitted.blocks[cached..], deadline, from) {
            Ok(res) => res,
            Err(e) => {
                s.engine.abort(admitted.id, None);
                return Err(Status::internal(format!("reserving blocks: {e}")));
            }
        };
        let (id, rid, n_blocks) = (admitted.id, r.request_id, blocks.len() - cached);
        let arrived = Arc::new(Mutex::new(None));
        let watcher = {
            let (state, arrived) = (s.clone(), arrived.clone());
            tokio::spawn(async move {
                let bytes = (n_blocks * state.layout.n_layers as usize * state.layout.layer_block_bytes()) as u64;
                match reservation.wait().await {
                    Ok(a) if a.num_tokens as usize == prompt_len => {
                        *arrived.lock().expect("arrived") = Some(Instant::now());
                        crate::metrics::kv_session(&state.id, "received", bytes, None);
                        state.engine.remote_ready(id, a.first_token);
                    }
                    Ok(a) => {
                        let why = format!("KV for {} tokens arrived for a prompt of {prompt_len}", a.num_tokens);
                        state.engine.abort(id, Some(why));
                    }
                    Err(e) => {
                        crate::metrics::kv_session(&state.id, "received", 0, Some(e.kind()));
                        // The transfer failed or its lease ended: the sender may still be
                        // writing. Tell the client now; free the blocks when it is safe.
                        state.engine.fail(id, format!("KV transfer failed: {e}"));
                        tokio::spawn(release_later(state.clone(), id, rid));
                        return;
                    }
                }
                // No Decode call attached within the lease: nobody wants the request.
                tokio::time::sleep_until(deadline).await;
                let stale = state.reserved.lock().expect("reserved").get(&rid).is_some_and(|r| r.events.is_some());
                if stale {
                    state.reserved.lock().expect("reserved").remove(&rid);
                    state.engine.abort(id, None);
                }
            })
        };
        // Abandoned if no `Decode` stream attaches soon.
        {
            let state = s.clone();
            tokio::spawn(async move {
                tokio::time::sleep(ATTACH_DEADLINE.min(lease)).await;
                let unattached = state
                    .reserved
                    .lock()
                    .expect("reserved")
                    .get(&rid)
                    .is_some_and(|r| r.id == id && r.events.is_some());
                if unattached {
                    state.cancel_reserved(rid, None);
                }
            });
        }
        s.reserved.lock().expect("reserved").insert(
            rid,
            Reserved {
                id,
                blocks: blocks.len(),
                events: Some(admitted.events),
                watcher,
                reserved_at: Instant::now(),
                kv_arrived: arrived,
            },
        );
        Ok(Response::new(pb::ReserveResponse {
            block_ids: blocks,
            cached_blocks: cached as u32,
            kv_endpoints: s.kv_endpoints.clone(),
            layout: Some(layout_to_pb(&s.layout)),
            lease_ms: lease.as_millis() as u32,
        }))
    }

    async fn prefill(&self, req: Request<pb::PrefillRequest>) -> Result<Response<pb::PrefillResponse>, Status> {
        let s = &self.0;
        let _inflight = InFlight::new(s);
        s.check_accepting()?;
        let (Some(sender), true) = (&s.sender, s.role.can_prefill()) else {
            return Err(Status::failed_precondition(format!("worker {} ({}) does not prefill", s.id, s.role)));
        };
        let r = req.into_inner();
        let dest = r.destination.ok_or_else(|| Status::invalid_argument("destination: missing"))?;
        let layout = layout_from_pb(&dest.layout.unwrap_or_default()).map_err(Status::invalid_argument)?;
        if let Some(m) = s.layout.mismatch(&layout) {
            return Err(Status::failed_precondition(format!("destination KV layout differs: {m}")));
        }
        let target = crate::peers::kv_target(&dest.endpoints.unwrap_or_default())?;
        if let Some(peers) = &s.peers {
            // KV goes only to the cluster's decode workers, at the endpoints they registered:
            // never to an address a caller names.
            let Some(d) = peers.decode_worker(&dest.worker_id, PEER_WAIT).await else {
                return Err(Status::failed_precondition(format!(
                    "destination {:?} is not a decode worker of this cluster",
                    dest.worker_id
                )));
            };
            let registered_local = d.kv.local.as_ref().map(|l| (l.uds.as_path(), l.host_id.as_str()));
            let named_local = target.local.as_ref().map(|l| (l.uds.as_path(), l.host.as_str()));
            if target.tcp != d.kv.tcp || named_local.is_some_and(|n| Some(n) != registered_local) {
                return Err(Status::failed_precondition(format!(
                    "destination endpoints are not the ones {:?} registered",
                    dest.worker_id
                )));
            }
        }
        let need = r.prompt_token_ids.len().div_ceil(s.layout.block_size as usize);
        if dest.block_ids.len() != need {
            return Err(Status::invalid_argument(format!(
                "destination has {} blocks for a prompt that needs {need}",
                dest.block_ids.len()
            )));
        }
        // The destination's cache never holds the block of the last prompt token.
        let skip = dest.cached_blocks as usize;
        if skip >= need {
            return Err(Status::invalid_argument(format!(
                "destination holds {skip} of the prompt's {need} blocks already; at most {} can be",
                need - 1
            )));
        }
        let submitted = Instant::now();
        // The transfer ends with the destination's reservation: nothing waits for it after.
        let lease = match dest.lease_ms {
            0 => s.max_lease,
            ms => Duration::from_millis(ms as u64).min(s.max_lease),
        };
        let deadline = tokio::time::Instant::now() + lease;
        let kv_failed =
            |e: &tandem_kvtransfer::TransferError| crate::metrics::kv_session(&s.id, "sent", 0, Some(e.kind()));
        let session = sender.open_target(&target, ClusterRequestId(r.request_id), deadline).await.map_err(|e| {
            kv_failed(&e);
            kv_fault(Status::unavailable(format!("cannot open a KV session to {}: {e}", dest.worker_id)))
        })?;
        let kv_bytes = ((need - skip) * s.layout.n_layers as usize * s.layout.layer_block_bytes()) as u64;
        let renewer = session.renewer();
        let (sink, task, started) = start_export(
            &tokio::runtime::Handle::current(),
            session,
            dest.block_ids.into_iter().map(BlockId).collect(),
            skip,
        );
        let mut params = sampling_from_pb(&r.sampling.unwrap_or_default());
        params.max_tokens = 1;
        params.stop.clear();
        let prompt_len = r.prompt_token_ids.len() as u32;
        let ereq = EngineRequest {
            prompt: r.prompt_token_ids,
            params,
            n: 1,
            priority: r.priority,
            cache_salt: r.cache_salt,
            export_kv: true,
            resumed: r.resumed_tokens as usize,
        };
        let mut admitted =
            s.engine.submit(ereq, Admission::Export(Box::new(sink))).await.map_err(status_from_engine)?;
        s.active.lock().expect("active").insert(r.request_id, admitted.id);
        let mut guard = RequestGuard { state: s.clone(), rid: r.request_id, id: admitted.id, done: false };
        let kv_lost = |e: &tandem_kvtransfer::TransferError| {
            kv_failed(e);
            kv_fault(Status::unavailable(format!("KV transfer to {} failed: {e}", dest.worker_id)))
        };
        // Queued or computing, the prefill renews the destination's reservation every third
        // of its lease, so a prompt that waits behind others keeps its blocks. It ends as soon
        // as the destination refuses the session (its lease ended, it was cancelled there) or
        // the transfer fails, or when no renewal got through for a whole lease: returning
        // drops the guard, which aborts the request, and the engine frees its blocks before
        // its next step.
        let every = (lease / 3).max(Duration::from_millis(50));
        let mut renewals = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut task, mut sent) = (task, None);
        let out = loop {
            let event = tokio::select! {
                e = admitted.events.recv() => e,
                _ = renewals.tick() => {
                    renewer.renew(lease).map_err(|e| kv_lost(&e))?;
                    continue;
                }
                e = renewer.refused() => return Err(kv_lost(&e)),
                r = &mut task, if sent.is_none() => {
                    match r.map_err(|e| Status::internal(format!("KV sender task: {e}")))? {
                        Err(e) => return Err(kv_lost(&e)),
                        // The sink is gone: the request has just finished or failed.
                        Ok(session) => sent = Some(session),
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(renewer.deadline()) => {
                    return Err(kv_fault(Status::unavailable(format!(
                        "the reservation on {} ended (lease {} ms) before the prefill finished; abandoned",
                        dest.worker_id,
                        lease.as_millis()
                    ))));
                }
            };
            match event {
                Some(Event::Output(o)) if o.finish.is_some() => break o,
                Some(Event::Output(_)) => continue,
                Some(Event::Failed(why)) => return Err(s.failed_status(r.request_id, why, Status::unavailable)),
                None => return Err(Status::internal("the engine dropped the request")),
            }
        };
        guard.done = true;
        let computed = Instant::now();
        let first = *out.token_ids.first().ok_or_else(|| Status::internal("the prefill sampled no token"))?;
        let session = match sent {
            Some(session) => session,
            None => {
                task.await.map_err(|e| Status::internal(format!("KV sender task: {e}")))?.map_err(|e| kv_lost(&e))?
            }
        };
        session.finish(first, prompt_len).await.map_err(|e| kv_lost(&e))?;
        let done = Instant::now();
        crate::metrics::kv_session(&s.id, "sent", kv_bytes, None);
        crate::metrics::kv_seconds(&s.id, done - started.get().copied().unwrap_or(computed));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let start = started.get().copied().unwrap_or(computed);
        Ok(Response::new(pb::PrefillResponse {
            first_token_id: first,
            text: out.text,
            logprobs: out.logprobs.first().map(|t| logprobs_to_pb(&s.tokenizer, t)),
            prompt_logprobs: out.prompt_logprobs.iter().map(|t| logprobs_to_pb(&s.tokenizer, t)).collect(),
            finish_reason: finish_to_pb(out.finish) as i32,
            cached_tokens: out.cached_tokens as u32,
            timing: Some(pb::PrefillTiming {
                queue_time_ms: ms(start.saturating_duration_since(submitted)),
                compute_time_ms: ms(computed.saturating_duration_since(start)),
                kv_transfer_tail_ms: ms(done - computed),
                total_time_ms: ms(done - submitted),
            }),
        }))
    }

    type DecodeStream = DecodeStream;

    async fn decode(&self, req: Request<pb::DecodeRequest>) -> Result<Response<DecodeStream>, Status> {
        let s = &self.0;
        let r = req.into_inner();
        let attached = {
            let mut reserved = s.reserved.lock().expect("reserved");
            match reserved.get_mut(&r.request_id) {
                Some(res) => match res.events.take() {
                    Some(ev) => Some((res.id, ev, res.reserved_at, res.kv_arrived.clone())),
                    None => {
                        return Err(Status::already_exists(format!("request {} is already attached", r.request_id)))
                    }
                },
                None => None,
            }
        };
        if let Some((id, events, at, arrived)) = attached {
            return Ok(Response::new(self.stream_events(r.request_id, id, events, Some((at, arrived)))));
        }
        if r.prompt_token_ids.is_empty() {
            return Err(Status::not_found(format!("request {} is not reserved on {}", r.request_id, s.id)));
        }
        // A decode worker prefills itself only to recover a request whose KV transfer failed.
        if !(s.role == Role::Both || (r.recompute && s.role.can_decode())) {
            return Err(Status::failed_precondition(format!("worker {} ({}) does not prefill locally", s.id, s.role)));
        }
        s.check_accepting()?;
        let ereq = EngineRequest {
            prompt: r.prompt_token_ids,
            params: sampling_from_pb(&r.sampling.unwrap_or_default()),
            n: 1,
            priority: r.priority,
            cache_salt: r.cache_salt,
            export_kv: false,
            resumed: r.resumed_tokens as usize,
        };
        let admitted = s.engine.submit(ereq, Admission::Local).await.map_err(status_from_engine)?;
        Ok(Response::new(self.stream_events(r.request_id, admitted.id, admitted.events, None)))
    }

    async fn cancel(&self, req: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        let s = &self.0;
        let r = req.into_inner();
        let reserved = s.reserved.lock().expect("reserved").contains_key(&r.request_id);
        let active = s.active.lock().expect("active").get(&r.request_id).copied();
        if !reserved && active.is_none() {
            // Nothing to cancel, and nothing remembered: the id may be someone's later request.
            return Ok(Response::new(pb::CancelResponse { found: false, freed_blocks: 0 }));
        }
        {
            // The tombstone goes first, so the stream that ends next reports CANCELLED.
            let mut c = s.cancelled.lock().expect("cancelled");
            c.retain(|_, at| at.elapsed() < TOMBSTONE_TTL);
            c.insert(r.request_id, Instant::now());
        }
        let reason = Some(format!("cancelled: {}", if r.reason.is_empty() { "by the router" } else { &r.reason }));
        if let Some(blocks) = s.cancel_reserved(r.request_id, reason.clone()) {
            return Ok(Response::new(pb::CancelResponse { found: true, freed_blocks: blocks as u32 }));
        }
        if let Some(id) = active {
            s.engine.abort(id, reason);
        }
        Ok(Response::new(pb::CancelResponse { found: active.is_some(), freed_blocks: 0 }))
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let s = &self.0;
        let l = s.engine.load().await.map_err(status_from_engine)?;
        let st = l.scheduler;
        Ok(Response::new(pb::StatsResponse {
            running: st.running.saturating_sub(l.waiting_for_kv) as u32,
            waiting: st.waiting as u32,
            waiting_for_kv: l.waiting_for_kv as u32,
            queued_prefill_tokens: l.queued_prefill_tokens,
            kv_blocks_used: st.blocks_used as u32,
            kv_blocks_total: st.blocks_total as u32,
            prefix_cache_queried_tokens: st.prefix_queried_tokens,
            prefix_cache_hit_tokens: st.prefix_hit_tokens,
            preemptions: st.preemptions,
            draining: s.draining.load(Ordering::SeqCst),
            fenced: s.fenced.load(Ordering::SeqCst),
        }))
    }

    type KvEventsStream = ReceiverStream<Result<pb::KvEventBatch, Status>>;

    async fn kv_events(&self, _req: Request<pb::KvEventsRequest>) -> Result<Response<Self::KvEventsStream>, Status> {
        let s = self.0.clone();
        let mut sub = s.engine.kv_events();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let ids = AtomicU64::new(1);
            let next = || ids.fetch_add(1, Ordering::Relaxed);
            // The stream starts from an empty index; what is cached before it arrives
            // as `stored` events when blocks are next registered.
            let first = pb::KvEventBatch {
                events: vec![pb::KvEvent {
                    event_id: next(),
                    event: Some(pb::kv_event::Event::Cleared(pb::KvCleared {})),
                }],
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let batch = tokio::select! {
                    b = sub.recv() => b,
                    _ = tx.closed() => return,
                };
                let events = match batch {
                    Ok(b) => b.into_iter().map(|e| kv_event_to_pb(e, next())).collect(),
                    // Fell behind: tell the subscriber to start over.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        vec![pb::KvEvent {
                            event_id: next(),
                            event: Some(pb::kv_event::Event::Cleared(pb::KvCleared {})),
                        }]
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(pb::KvEventBatch { events })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type DrainStream = ReceiverStream<Result<pb::DrainStatus, Status>>;

    async fn drain(&self, req: Request<pb::DrainRequest>) -> Result<Response<Self::DrainStream>, Status> {
        let s = self.0.clone();
        s.draining.store(true, Ordering::SeqCst);
        let deadline = req.into_inner().deadline_ms.map(|ms| Instant::now() + Duration::from_millis(ms as u64));
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let mut aborted: Option<usize> = None;
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) && aborted.is_none() {
                    aborted = Some(s.abort_all("the worker drained past its deadline"));
                }
                let Ok(l) = s.engine.load().await else { return };
                let drained = s.outstanding() == 0 && l.scheduler.running == 0 && l.scheduler.waiting == 0;
                let status = pb::DrainStatus {
                    running: l.scheduler.running.saturating_sub(l.waiting_for_kv) as u32,
                    waiting: l.scheduler.waiting as u32,
                    waiting_for_kv: l.waiting_for_kv as u32,
                    aborted: aborted.unwrap_or(0) as u32,
                    drained,
                };
                if tx.send(Ok(status)).await.is_err() || drained {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn kv_event_to_pb(e: tandem_engine::block_manager::KvEvent, event_id: u64) -> pb::KvEvent {
    use tandem_engine::block_manager::KvEvent;
    let event = match e {
        KvEvent::Stored { parent, hashes } => pb::kv_event::Event::Stored(pb::KvStored {
            parent_hash: parent.map(|h| h.0),
            block_hashes: hashes.into_iter().map(|h| h.0).collect(),
        }),
        KvEvent::Removed { hashes } => {
            pb::kv_event::Event::Removed(pb::KvRemoved { block_hashes: hashes.into_iter().map(|h| h.0).collect() })
        }
    };
    pb::KvEvent { event_id, event: Some(event) }
}
