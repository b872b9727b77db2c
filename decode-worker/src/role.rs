//! The decode role: `Reserve` holds blocks for a prompt whose KV a prefill worker
//! will send (`Reservations`), and `Decode` streams the generation, attached to a
//! reservation or, on a worker of role `both` (or to recompute a request whose KV
//! transfer failed), prefilled here. What the runtime answers for every role
//! (draining, fenced, `Cancel`, `Stats`) is not here.

use std::sync::Arc;
use std::time::Duration;

use tandem_cluster::Role;
use tandem_engine::kv_cache::BlockId;
use tandem_engine::llm_engine::RemoteKv;
use tandem_kvtransfer::KvReceiver;
use tandem_proto::ids::{ClusterRequestId, LeaseId};
use tandem_proto::tandem::worker::v1 as pb;
use tandem_worker_runtime::convert::{engine_request, layout_to_pb, sampling_from_pb, status_from_engine};
use tandem_worker_runtime::{Admission, DecodeRole, DecodeStream, RoleContext, WorkerState};
use tonic::Status;

use crate::migrate::{Mover, Streams};
use crate::reservations::{NewReservation, Reservations, Timing};
use crate::stream::stream_events;

/// A worker's decode role.
pub struct DecodeWorker {
    state: Arc<WorkerState>,
    receiver: Arc<KvReceiver>,
    kv_endpoints: Option<pb::KvEndpoints>,
    reservations: Reservations,
    /// The decode streams in progress (what a live migration moves).
    streams: Streams,
    mover: Mover,
}

impl DecodeWorker {
    /// The decode role of the worker `ctx` describes (which must be decode-capable: it has
    /// a KV receiver).
    pub fn build(ctx: &RoleContext) -> Arc<dyn DecodeRole> {
        let receiver = ctx.receiver.clone().expect("a decode-capable worker has a KV receiver");
        let s = &ctx.state;
        let reservations =
            Reservations::new(s.id.clone(), Arc::new(s.engine.clone()), receiver.clone(), Timing::default());
        let streams = Streams::default();
        let mover = Mover {
            state: s.clone(),
            sender: ctx.sender.clone(),
            segment: ctx.segment.clone(),
            peers: ctx.peers.clone(),
            streams: streams.clone(),
            watchdogs: Default::default(),
            committing: Default::default(),
        };
        Arc::new(DecodeWorker {
            state: s.clone(),
            receiver,
            kv_endpoints: ctx.kv_endpoints.clone(),
            reservations,
            streams,
            mover,
        })
    }
}

#[tonic::async_trait]
impl DecodeRole for DecodeWorker {
    async fn reserve(&self, r: pb::ReserveRequest) -> Result<pb::ReserveResponse, Status> {
        let s = &self.state;
        let (rid, sender_lease) = (ClusterRequestId(r.request_id), LeaseId::from_wire(r.sender_lease));
        if self.reservations.contains(rid) {
            return Err(Status::already_exists(format!("request {rid} is already reserved")));
        }
        if s.was_cancelled(rid) {
            return Err(Status::cancelled(format!("request {rid} was cancelled")));
        }
        let mut params = sampling_from_pb(&r.sampling.unwrap_or_default());
        // The prefill worker computes (and scores) the prompt; this side never does.
        params.prompt_logprobs = None;
        let prompt_len = r.prompt_token_ids.len();
        let kind = match (r.cache_only, r.first_token_delivered) {
            (true, false) => RemoteKv::CacheOnly,
            (false, true) => RemoteKv::Continue,
            (false, false) => RemoteKv::Decode,
            (true, true) => {
                return Err(Status::invalid_argument("a cache-only reservation has no first token to deliver"))
            }
        };
        let ereq = engine_request(
            r.prompt_token_ids,
            params,
            r.priority,
            r.cache_salt,
            r.resumed_tokens,
            r.scheduling.as_ref(),
        );
        // Had this call gone away before the engine's answer was taken, the unclaimed answer
        // would have ended the request; from here on, ending it is this role's job.
        let admitted = s.engine.submit(ereq, Admission::RemoteAs(kind)).await.map_err(status_from_engine)?;
        admitted.claim();
        let lease = Duration::from_millis(r.lease_ms.max(1) as u64).min(s.max_lease);
        let deadline = tokio::time::Instant::now() + lease;
        let blocks = &admitted.blocks;
        // Leading blocks this worker's prefix cache holds are not sent: only the rest is
        // reserved for the transfer.
        let cached = admitted.cached_blocks.min(blocks.len());
        let reservation = match self.receiver.reserve_from(rid, &blocks[cached..], deadline, sender_lease) {
            Ok(res) => res,
            Err(e) => {
                s.engine.abort(admitted.id, None);
                return Err(Status::internal(format!("reserving blocks: {e}")));
            }
        };
        let n_sent = blocks.len() - cached;
        let new = NewReservation {
            rid,
            id: admitted.id,
            blocks: blocks.len(),
            prompt_len,
            kv_bytes: (n_sent * s.layout.n_layers as usize * s.layout.layer_block_bytes()) as u64,
            events: admitted.events,
            lease,
            cache_only: r.cache_only,
        };
        self.reservations.insert(new, Box::pin(reservation.wait()));
        Ok(pb::ReserveResponse {
            block_ids: BlockId::as_u32s(blocks).to_vec(),
            cached_blocks: cached as u32,
            kv_endpoints: self.kv_endpoints.clone(),
            layout: Some(layout_to_pb(&s.layout)),
            lease_ms: lease.as_millis() as u32,
        })
    }

    async fn decode(&self, r: pb::DecodeRequest) -> Result<DecodeStream, Status> {
        let s = &self.state;
        let rid = ClusterRequestId(r.request_id);
        if let Some(a) = self.reservations.attach(rid)? {
            let timing = Some((a.reserved_at, a.arrived));
            return Ok(stream_events(s, (&self.reservations, &self.streams), (rid, a.id), a.events, timing));
        }
        if r.prompt_token_ids.is_empty() {
            return Err(Status::not_found(format!("request {} is not reserved on {}", r.request_id, s.id)));
        }
        // A decode worker prefills itself only to recover a request whose KV transfer failed.
        let role = s.role();
        if !(role == Role::Both || (r.recompute && role.can_decode())) {
            return Err(Status::failed_precondition(format!("worker {} ({role}) does not prefill locally", s.id)));
        }
        s.check_accepting()?;
        let params = sampling_from_pb(&r.sampling.unwrap_or_default());
        let ereq = engine_request(
            r.prompt_token_ids,
            params,
            r.priority,
            r.cache_salt,
            r.resumed_tokens,
            r.scheduling.as_ref(),
        );
        let admitted = s.engine.submit(ereq, Admission::Local).await.map_err(status_from_engine)?;
        Ok(stream_events(s, (&self.reservations, &self.streams), (rid, admitted.id), admitted.events, None))
    }

    fn is_reserved(&self, rid: ClusterRequestId) -> bool {
        self.reservations.contains(rid)
    }

    fn cancel_reserved(&self, rid: ClusterRequestId, reason: Option<String>) -> Option<usize> {
        self.reservations.cancel(rid, reason)
    }

    fn reserved_ids(&self) -> Vec<ClusterRequestId> {
        self.reservations.ids()
    }

    async fn migrate(&self, r: pb::MigrateRequest) -> Result<pb::MigrateResponse, Status> {
        self.mover.migrate(r).await
    }

    async fn ask_moves(&self, required: bool) -> usize {
        self.mover.ask_all(required).await
    }

    fn decoding(&self) -> usize {
        self.streams.lock().expect("streams").len()
    }

    async fn shutdown(&self) {
        self.reservations.shutdown();
        self.mover.shutdown();
    }
}
