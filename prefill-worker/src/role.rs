//! The prefill role: `Prefill` computes a prompt and ships its KV, layer by layer,
//! into a decode worker's reservation, then answers with the first sampled token.
//!
//! KV goes only to a decode worker this worker's own discovery watch lists, at the
//! endpoints it registered (`Peers`); the transfer renews the destination's lease
//! while the prompt waits or computes, and stops as soon as the destination refuses
//! it. What the runtime answers for every role (draining, fenced, `Cancel`) is not
//! here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_kvtransfer::{KvSender, TransferError};
use tandem_proto::ids::ClusterRequestId;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_worker_runtime::convert::{
    engine_request, finish_to_pb, kv_fault, logprobs_to_pb, sampling_from_pb, status_from_engine,
};
use tandem_worker_runtime::{Admission, Event, PrefillRole, RoleContext, WorkerState};
use tonic::Status;

use tandem_worker_runtime::peers::{check_destination, Peers};

use crate::export::start_export;

/// A worker's prefill role.
pub struct PrefillWorker {
    state: Arc<WorkerState>,
    sender: Arc<KvSender>,
    /// The cluster's workers as discovery lists them (workers with discovery): a
    /// `Prefill` sends KV only to a decode worker listed here, at the endpoints it
    /// registered. `None`: no check (a worker without discovery).
    peers: Option<Peers>,
}

impl PrefillWorker {
    /// The prefill role of the worker `ctx` describes (which must be prefill-capable: it
    /// has a KV sender).
    pub fn build(ctx: &RoleContext) -> Arc<dyn PrefillRole> {
        let sender = ctx.sender.clone().expect("a prefill-capable worker has a KV sender");
        Arc::new(PrefillWorker { state: ctx.state.clone(), sender, peers: ctx.peers.clone() })
    }

    fn kv_failed(&self, e: &TransferError) {
        tandem_worker_runtime::metrics::kv_session(&self.state.id, "sent", 0, Some(e.kind()));
    }
}

#[tonic::async_trait]
impl PrefillRole for PrefillWorker {
    async fn prefill(&self, r: pb::PrefillRequest) -> Result<pb::PrefillResponse, Status> {
        let s = &self.state;
        let rid = ClusterRequestId(r.request_id);
        let dest = r.destination.ok_or_else(|| Status::invalid_argument("destination: missing"))?;
        let need = r.prompt_token_ids.len().div_ceil(s.layout.block_size as usize);
        let dest = check_destination(s, self.peers.as_ref(), dest, need).await?;
        let submitted = Instant::now();
        let lease = dest.lease;
        let deadline = tokio::time::Instant::now() + lease;
        let session = self.sender.open_target(&dest.target, rid, deadline).await.map_err(|e| {
            self.kv_failed(&e);
            kv_fault(Status::unavailable(format!("cannot open a KV session to {}: {e}", dest.worker_id)))
        })?;
        let kv_bytes = ((need - dest.skip) * s.layout.n_layers as usize * s.layout.layer_block_bytes()) as u64;
        let renewer = session.renewer();
        let (sink, task, started) =
            start_export(&tokio::runtime::Handle::current(), session, dest.block_ids, dest.skip);
        let mut params = sampling_from_pb(&r.sampling.unwrap_or_default());
        params.max_tokens = 1;
        params.stop.clear();
        let prompt_len = r.prompt_token_ids.len() as u32;
        let ereq = engine_request(
            r.prompt_token_ids,
            params,
            r.priority,
            r.cache_salt,
            r.resumed_tokens,
            r.scheduling.as_ref(),
        );
        let mut admitted =
            s.engine.submit(ereq, Admission::Export(Box::new(sink))).await.map_err(status_from_engine)?;
        let mut active = s.track(rid, admitted.id);
        let kv_lost = |e: &TransferError| {
            self.kv_failed(e);
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
                Some(Event::Failed(why)) => return Err(s.failed_status(rid, why, Status::unavailable)),
                // Its earlier outputs, and migration signals (a prefill never moves).
                Some(_) => continue,
                None => return Err(Status::internal("the engine dropped the request")),
            }
        };
        active.finish();
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
        tandem_worker_runtime::metrics::kv_session(&s.id, "sent", kv_bytes, None);
        tandem_worker_runtime::metrics::kv_seconds(&s.id, done - started.get().copied().unwrap_or(computed));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let start = started.get().copied().unwrap_or(computed);
        Ok(pb::PrefillResponse {
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
        })
    }
}
