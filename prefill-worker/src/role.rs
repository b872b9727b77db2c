//! The prefill role: `Prefill` computes a prompt and ships its KV, layer by layer,
//! into a decode worker's reservation, then answers with the first sampled token.
//!
//! KV goes only to a decode worker this worker's own discovery watch lists, at the
//! endpoints it registered (`Peers`); the transfer renews the destination's lease
//! while the prompt waits or computes, and stops as soon as the destination refuses
//! it. What the runtime answers for every role (draining, fenced, `Cancel`) is not
//! here.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_engine::kv_cache::BlockId;
use tandem_kvtransfer::{KvSender, KvTarget, TransferError};
use tandem_proto::ids::ClusterRequestId;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_worker_runtime::convert::{
    engine_request, finish_to_pb, kv_fault, layout_from_pb, logprobs_to_pb, sampling_from_pb, status_from_engine,
};
use tandem_worker_runtime::{Admission, Event, PrefillRole, RoleContext, WorkerState};
use tokio::task::JoinHandle;
use tonic::Status;

use crate::export::start_export;
use crate::peers::{kv_target, Peers};

/// How long a `Prefill` naming a destination this worker's view of discovery does not
/// hold yet waits for the view to catch up (the router may have seen it join first).
const PEER_WAIT: Duration = Duration::from_secs(2);

/// A worker's prefill role.
pub struct PrefillWorker {
    state: Arc<WorkerState>,
    sender: Arc<KvSender>,
    /// The cluster's workers as discovery lists them (workers with discovery): a
    /// `Prefill` sends KV only to a decode worker listed here, at the endpoints it
    /// registered. `None`: no check (a worker without discovery).
    peers: Option<Peers>,
    /// Keeps `peers` in step with discovery; aborted at shutdown.
    follow: Mutex<Option<JoinHandle<()>>>,
}

/// A `Prefill`'s destination, checked.
struct Destination {
    worker_id: String,
    target: KvTarget,
    block_ids: Vec<BlockId>,
    /// Blocks of the prompt.
    need: usize,
    /// Leading blocks the destination holds already: not sent.
    skip: usize,
    /// The destination's reservation lease (the transfer ends with it).
    lease: Duration,
}

impl PrefillWorker {
    /// The prefill role of the worker `ctx` describes (which must be prefill-capable: it
    /// has a KV sender). With discovery, it starts following the cluster's members.
    pub fn build(ctx: &RoleContext) -> Arc<dyn PrefillRole> {
        let sender = ctx.sender.clone().expect("a prefill-capable worker has a KV sender");
        let (peers, follow) = match &ctx.discovery {
            Some((d, cluster)) => {
                let peers = Peers::default();
                let task = tokio::spawn(crate::peers::follow_peers(d.clone(), cluster.clone(), peers.clone()));
                (Some(peers), Some(task))
            }
            None => (None, None),
        };
        Arc::new(PrefillWorker { state: ctx.state.clone(), sender, peers, follow: Mutex::new(follow) })
    }

    /// Checks a `Prefill`'s destination: its layout, that it is a decode worker of this
    /// cluster at the endpoints it registered, and its blocks against the prompt.
    async fn destination(&self, dest: pb::KvDestination, prompt_len: usize) -> Result<Destination, Status> {
        let s = &self.state;
        let layout = layout_from_pb(&dest.layout.unwrap_or_default()).map_err(Status::invalid_argument)?;
        if let Some(m) = s.layout.mismatch(&layout) {
            return Err(Status::failed_precondition(format!("destination KV layout differs: {m}")));
        }
        let target = kv_target(&dest.endpoints.unwrap_or_default())?;
        if let Some(peers) = &self.peers {
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
        let need = prompt_len.div_ceil(s.layout.block_size as usize);
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
        // The transfer ends with the destination's reservation: nothing waits for it after.
        let lease = match dest.lease_ms {
            0 => s.max_lease,
            ms => Duration::from_millis(ms as u64).min(s.max_lease),
        };
        let block_ids = dest.block_ids.into_iter().map(BlockId).collect();
        Ok(Destination { worker_id: dest.worker_id, target, block_ids, need, skip, lease })
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
        let dest = self.destination(dest, r.prompt_token_ids.len()).await?;
        let submitted = Instant::now();
        let lease = dest.lease;
        let deadline = tokio::time::Instant::now() + lease;
        let session = self.sender.open_target(&dest.target, rid, deadline).await.map_err(|e| {
            self.kv_failed(&e);
            kv_fault(Status::unavailable(format!("cannot open a KV session to {}: {e}", dest.worker_id)))
        })?;
        let kv_bytes = ((dest.need - dest.skip) * s.layout.n_layers as usize * s.layout.layer_block_bytes()) as u64;
        let renewer = session.renewer();
        let (sink, task, started) =
            start_export(&tokio::runtime::Handle::current(), session, dest.block_ids, dest.skip);
        let mut params = sampling_from_pb(&r.sampling.unwrap_or_default());
        params.max_tokens = 1;
        params.stop.clear();
        let prompt_len = r.prompt_token_ids.len() as u32;
        let ereq = engine_request(r.prompt_token_ids, params, r.priority, r.cache_salt, r.resumed_tokens);
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
                Some(Event::Output(_)) => continue,
                Some(Event::Failed(why)) => return Err(s.failed_status(rid, why, Status::unavailable)),
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

    async fn shutdown(&self) {
        if let Some(t) = self.follow.lock().expect("follow").take() {
            t.abort();
        }
    }
}
