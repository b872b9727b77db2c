//! The `tandem.worker.v1.Worker` service: one implementation for every role.
//!
//! The runtime answers what every worker answers (`Cancel`, `Stats`, `KvEvents`,
//! `Drain`) and delegates the rest to the roles the worker was built with:
//! `Prefill` to a [`PrefillRole`], `Reserve` and `Decode` to a [`DecodeRole`]. A
//! worker of role `both` holds both; a call for a role the worker does not hold
//! gets the status it always got (FAILED_PRECONDITION "does not decode", ...).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::ids::ClusterRequestId;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_server::Worker;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::convert::{kv_event_to_pb, status_from_engine};
use crate::role_switch::RoleSwitch;
use crate::state::{InFlight, WorkerState};

/// A `Decode` call's stream.
pub type DecodeStream = ReceiverStream<Result<pb::DecodeResponse, Status>>;

/// The prefill role: computes a prompt and ships its KV to a decode worker.
#[tonic::async_trait]
pub trait PrefillRole: Send + Sync {
    /// Serves `Prefill` (the runtime has checked the worker takes new work).
    async fn prefill(&self, req: pb::PrefillRequest) -> Result<pb::PrefillResponse, Status>;

    /// Stops the role's own tasks (the end of a drain).
    async fn shutdown(&self) {}
}

/// The decode role: reservations for KV that prefill workers send, and the streams of
/// generated tokens.
#[tonic::async_trait]
pub trait DecodeRole: Send + Sync {
    /// Serves `Reserve` (the runtime has checked the worker takes new work).
    async fn reserve(&self, req: pb::ReserveRequest) -> Result<pb::ReserveResponse, Status>;

    /// Serves `Decode`: attaches to a reservation, or prefills locally.
    async fn decode(&self, req: pb::DecodeRequest) -> Result<DecodeStream, Status>;

    /// Whether `rid` holds a reservation.
    fn is_reserved(&self, rid: ClusterRequestId) -> bool;

    /// Ends reservation `rid` (a `Cancel`, or a drain past its deadline with `reason`);
    /// returns the blocks it held, or `None` when there was none.
    fn cancel_reserved(&self, rid: ClusterRequestId, reason: Option<String>) -> Option<usize>;

    /// Router ids of the reservations held.
    fn reserved_ids(&self) -> Vec<ClusterRequestId>;

    /// Serves `Migrate`: one step of a live migration of a decode running here.
    async fn migrate(&self, _req: pb::MigrateRequest) -> Result<pb::MigrateResponse, Status> {
        Err(Status::failed_precondition("this worker does not move requests"))
    }

    /// Asks the routers of the decodes running here to move them (a drain, a role change:
    /// `required`); returns how many were asked now (each is asked once).
    async fn ask_moves(&self, _required: bool) -> usize {
        0
    }

    /// Decode streams in progress.
    fn decoding(&self) -> usize {
        0
    }

    /// Stops the role's own tasks (the end of a drain).
    async fn shutdown(&self) {}
}

/// The roles one worker holds.
#[derive(Clone, Default)]
pub struct Roles {
    pub prefill: Option<Arc<dyn PrefillRole>>,
    pub decode: Option<Arc<dyn DecodeRole>>,
}

/// Serves `tandem.worker.v1.Worker` for one worker.
#[derive(Clone)]
pub struct WorkerService {
    pub state: Arc<WorkerState>,
    /// The roles the worker was built with: an elastic worker holds both and serves the
    /// ones its current role (`WorkerState::role`) names.
    pub roles: Roles,
    /// Where a prefill-capable worker's KV leaves (it announces each new lease).
    pub sender: Option<Arc<tandem_kvtransfer::KvSender>>,
    /// Its registration, and role changes (`SetRole`).
    pub switch: Arc<RoleSwitch>,
}

impl WorkerService {
    /// Requests this worker still holds: reserved, prefilling or decoding.
    pub fn outstanding(&self) -> usize {
        let reserved = self.roles.decode.as_ref().map_or(0, |d| d.reserved_ids().len());
        reserved + self.state.active_ids().len()
    }

    /// Decode streams in progress here.
    pub fn decoding(&self) -> usize {
        self.roles.decode.as_ref().map_or(0, |d| d.decoding())
    }

    /// Asks the routers of the decodes running here to move them elsewhere (live
    /// migration; `required`: recompute where the KV cannot move); returns how many were
    /// asked now.
    pub async fn ask_moves(&self, required: bool) -> usize {
        match &self.roles.decode {
            Some(d) => d.ask_moves(required).await,
            None => 0,
        }
    }

    /// Ends every request this worker holds (a drain past its deadline); returns how many.
    pub fn abort_all(&self, reason: &str) -> usize {
        let reserved = self.roles.decode.as_ref().map(|d| d.reserved_ids()).unwrap_or_default();
        let active = self.state.active_ids();
        if let Some(d) = &self.roles.decode {
            for rid in &reserved {
                d.cancel_reserved(*rid, Some(reason.to_string()));
            }
        }
        for id in &active {
            self.state.engine.abort(*id, Some(reason.to_string()));
        }
        reserved.len() + active.len()
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn reserve(&self, req: Request<pb::ReserveRequest>) -> Result<Response<pb::ReserveResponse>, Status> {
        let s = &self.state;
        let _inflight = InFlight::new(s);
        s.check_accepting()?;
        let Some(decode) = self.roles.decode.as_ref().filter(|_| s.role().can_decode()) else {
            return Err(Status::failed_precondition(format!("worker {} ({}) does not decode", s.id, s.role())));
        };
        decode.reserve(req.into_inner()).await.map(Response::new)
    }

    async fn prefill(&self, req: Request<pb::PrefillRequest>) -> Result<Response<pb::PrefillResponse>, Status> {
        let s = &self.state;
        let _inflight = InFlight::new(s);
        s.check_accepting()?;
        let Some(prefill) = self.roles.prefill.as_ref().filter(|_| s.role().can_prefill()) else {
            return Err(Status::failed_precondition(format!("worker {} ({}) does not prefill", s.id, s.role())));
        };
        let _prefilling = Prefilling::new(s);
        prefill.prefill(req.into_inner()).await.map(Response::new)
    }

    type DecodeStream = DecodeStream;

    async fn decode(&self, req: Request<pb::DecodeRequest>) -> Result<Response<DecodeStream>, Status> {
        let s = &self.state;
        let r = req.into_inner();
        match &self.roles.decode {
            Some(decode) => decode.decode(r).await.map(Response::new),
            // Nothing is reserved on a worker that does not decode, and it prefills nothing locally.
            None if r.prompt_token_ids.is_empty() => {
                Err(Status::not_found(format!("request {} is not reserved on {}", r.request_id, s.id)))
            }
            None => {
                Err(Status::failed_precondition(format!("worker {} ({}) does not prefill locally", s.id, s.role())))
            }
        }
    }

    async fn cancel(&self, req: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        let s = &self.state;
        let r = req.into_inner();
        let rid = ClusterRequestId(r.request_id);
        let reserved = self.roles.decode.as_ref().is_some_and(|d| d.is_reserved(rid));
        let active = s.active(rid);
        if !reserved && active.is_none() {
            // Nothing to cancel, and nothing remembered: the id may be someone's later request.
            return Ok(Response::new(pb::CancelResponse { found: false, freed_blocks: 0 }));
        }
        // The tombstone goes first, so the stream that ends next reports CANCELLED.
        s.bury(rid);
        let reason = Some(format!("cancelled: {}", if r.reason.is_empty() { "by the router" } else { &r.reason }));
        if let Some(blocks) = self.roles.decode.as_ref().and_then(|d| d.cancel_reserved(rid, reason.clone())) {
            return Ok(Response::new(pb::CancelResponse { found: true, freed_blocks: blocks as u32 }));
        }
        if let Some(id) = active {
            s.engine.abort(id, reason);
        }
        Ok(Response::new(pb::CancelResponse { found: active.is_some(), freed_blocks: 0 }))
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let s = &self.state;
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
            role: s.role().to_pb(),
            elastic: s.elastic,
            prefills_in_flight: s.prefills.load(Ordering::SeqCst) as u32,
            changing_role: s.changing_role.load(Ordering::SeqCst),
            tenant_service: l
                .tenant_service
                .into_iter()
                .map(|(tenant, service)| pb::TenantService { tenant, service })
                .collect(),
        }))
    }

    type KvEventsStream = ReceiverStream<Result<pb::KvEventBatch, Status>>;

    async fn kv_events(&self, _req: Request<pb::KvEventsRequest>) -> Result<Response<Self::KvEventsStream>, Status> {
        let sub = tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.state.engine.subscribe_kv())
            .await
            .map_err(|_| Status::unavailable("the engine did not take the subscription in time"))?
            .map_err(status_from_engine)?;
        let (tx, rx) = mpsc::channel(64);
        // Detached on purpose: the task ends when its subscriber goes (`tx.closed()`) or
        // the engine stops (the broadcast closes); nothing else holds it.
        tokio::spawn(async move {
            let crate::actor::KvSubscription { snapshot, mut live } = sub;
            let mut ids = 1u64..;
            let mut next = move || ids.next().expect("an unbounded range");
            for batch in kv_snapshot_batches(snapshot.into_iter().map(|h| h.0).collect(), &mut next) {
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
            loop {
                let batch = tokio::select! {
                    b = live.recv() => b,
                    _ = tx.closed() => return,
                };
                let events = match batch {
                    Ok(b) => b.into_iter().map(|e| kv_event_to_pb(e, next())).collect(),
                    // Fell behind: skipping changes would leave the subscriber wrong without
                    // knowing it. End the stream; it subscribes again from a fresh snapshot.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!("fell {n} batches behind the cache's changes"))))
                            .await;
                        return;
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

    async fn set_role(&self, req: Request<pb::SetRoleRequest>) -> Result<Response<pb::SetRoleResponse>, Status> {
        self.switch.set_role(self, req.into_inner()).await.map(Response::new)
    }

    async fn migrate(&self, req: Request<pb::MigrateRequest>) -> Result<Response<pb::MigrateResponse>, Status> {
        let s = &self.state;
        let _inflight = InFlight::new(s);
        let Some(decode) = &self.roles.decode else {
            return Err(Status::failed_precondition(format!("worker {} ({}) does not decode", s.id, s.role())));
        };
        decode.migrate(req.into_inner()).await.map(Response::new)
    }

    type DrainStream = ReceiverStream<Result<pb::DrainStatus, Status>>;

    async fn drain(&self, req: Request<pb::DrainRequest>) -> Result<Response<Self::DrainStream>, Status> {
        let svc = self.clone();
        svc.state.draining.store(true, Ordering::SeqCst);
        let req = req.into_inner();
        let deadline = req.deadline_ms.map(|ms| Instant::now() + Duration::from_millis(ms as u64));
        let migrate = req.migrate;
        let (tx, rx) = mpsc::channel(8);
        // Detached on purpose: it reports until the worker is drained or its caller goes
        // away (a failed send), and holds nothing a shutdown must wait for.
        tokio::spawn(async move {
            let mut aborted: Option<usize> = None;
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) && aborted.is_none() {
                    aborted = Some(svc.abort_all("the worker drained past its deadline"));
                }
                if migrate && aborted.is_none() {
                    // Decodes that started since (or were not decoding yet) are asked too.
                    svc.ask_moves(true).await;
                }
                let Ok(l) = svc.state.engine.load().await else { return };
                let drained = svc.outstanding() == 0 && l.scheduler.running == 0 && l.scheduler.waiting == 0;
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

/// Counts a `Prefill` call in progress (`WorkerState::prefills`) while it lives.
struct Prefilling(Arc<WorkerState>);

impl Prefilling {
    fn new(s: &Arc<WorkerState>) -> Prefilling {
        s.prefills.fetch_add(1, Ordering::SeqCst);
        Prefilling(s.clone())
    }
}

impl Drop for Prefilling {
    fn drop(&mut self) {
        self.0.prefills.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Longest wait for the engine thread to take a KV-event subscription (it answers between
/// steps).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Hashes per snapshot event: keeps each message far below gRPC's 4 MiB limit.
const SNAPSHOT_CHUNK: usize = 16_384;

/// The opening snapshot as batches of `snapshot` events, the last marked `last` (one empty
/// event for an empty cache), numbered by `next`.
fn kv_snapshot_batches(hashes: Vec<u64>, next: &mut impl FnMut() -> u64) -> Vec<pb::KvEventBatch> {
    let chunks: Vec<&[u64]> = if hashes.is_empty() { vec![&[]] } else { hashes.chunks(SNAPSHOT_CHUNK).collect() };
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| pb::KvEventBatch {
            events: vec![pb::KvEvent {
                event_id: next(),
                event: Some(pb::kv_event::Event::Snapshot(pb::KvSnapshot {
                    block_hashes: c.to_vec(),
                    last: i + 1 == n,
                })),
            }],
        })
        .collect()
}
