//! One choice of a request, across workers: pick a pair (or a role-`both` worker), reserve
//! the prompt's blocks on the decode worker, open its stream, have the prefill worker
//! compute and ship the KV, and relay the tokens. When an attempt fails, `recovery` says
//! what comes next (migrate, recover the KV per policy, pass over a full decode worker, or
//! give up) and the choice tries again from the prompt plus what it already sent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::WorkerId;
use tandem_proto::auth::WorkerChannel;
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;
use tokio::sync::mpsc;
use tonic::Status;

use crate::members::{Picked, Route};
use crate::metrics;
use crate::recovery::{self, Budget, Fault, KvFailurePolicy, Next, Plan, Recovery};
use crate::service::RouterState;
use crate::validate::Validated;

/// A worker's error as the client should see it: the worker named, client errors
/// kept, everything else UNAVAILABLE (the cluster could not serve it).
/// A CANCELLED is the worker's only when the worker sent it: a stream its transport cut
/// (the worker died, the connection reset) reads as CANCELLED too, with the transport's
/// error behind it, and is the worker's failure like any other.
fn worker_error(role: &str, id: &WorkerId, s: Status) -> Status {
    let msg = format!("{role} worker {id}: {}", s.message());
    let transport = std::error::Error::source(&s).is_some();
    match s.code() {
        tonic::Code::InvalidArgument => Status::invalid_argument(msg),
        tonic::Code::ResourceExhausted => Status::resource_exhausted(msg),
        tonic::Code::DeadlineExceeded => Status::deadline_exceeded(msg),
        tonic::Code::Cancelled if !transport => Status::cancelled(msg),
        _ => Status::unavailable(msg),
    }
}

/// One chunk of one choice, on its way to the client.
pub(crate) struct Chunk {
    pub(crate) index: u32,
    pub(crate) text: String,
    pub(crate) token_ids: Vec<u32>,
    pub(crate) logprobs: Vec<api::TokenLogprobs>,
    pub(crate) finish: api::FinishReason,
    pub(crate) prefill: Option<pb::PrefillResponse>,
    pub(crate) prompt_logprobs: Vec<api::TokenLogprobs>,
    /// Prompt tokens served from a prefix cache (first chunk only).
    pub(crate) cached_tokens: u32,
}

/// Sends Cancel to the workers of a choice that did not finish (client gone, error).
struct CancelOnDrop {
    rid: u64,
    clients: Vec<WorkerClient<WorkerChannel>>,
    done: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.done || self.clients.is_empty() {
            return;
        }
        let (rid, clients) = (self.rid, std::mem::take(&mut self.clients));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for mut c in clients {
                    let req = pb::CancelRequest { request_id: rid, reason: "the client went away".into() };
                    let _ = tokio::time::timeout(Duration::from_secs(1), c.cancel(req)).await;
                }
            });
        }
    }
}

pub(crate) async fn run_choice(
    s: Arc<RouterState>,
    v: Arc<Validated>,
    index: u32,
    out: mpsc::Sender<Result<Chunk, Status>>,
    accepted: Instant,
) {
    if let Err(e) = choice(&s, &v, index, &out, accepted).await {
        let _ = out.send(Err(e)).await;
    }
}

/// When a choice passed each point on its way to the first token.
#[derive(Debug, Clone, Copy)]
struct Marks {
    accepted: Instant,
    /// The prefill (or, for local generation, the decode) call was sent.
    sent: Instant,
    /// The prefill worker answered (disaggregated only).
    prefilled: Option<Instant>,
}

impl Marks {
    /// Records the time-to-first-token breakdown once the first token is out.
    fn first_token(&self, prefill: Option<&pb::PrefillResponse>) {
        let now = Instant::now();
        let router = (self.sent - self.accepted).as_secs_f64();
        metrics::stage("router", router);
        match (self.prefilled, prefill.and_then(|p| p.timing)) {
            (Some(done), Some(t)) => {
                metrics::stage("prefill_queue", t.queue_time_ms / 1e3);
                metrics::stage("prefill_compute", t.compute_time_ms / 1e3);
                metrics::stage("kv_transfer", t.kv_transfer_tail_ms / 1e3);
                metrics::stage("decode_wait", (now - done).as_secs_f64());
                metrics::seconds(metrics::QUEUE, Duration::from_secs_f64(router + t.queue_time_ms / 1e3));
            }
            _ => {
                metrics::stage("local", (now - self.sent).as_secs_f64());
                metrics::seconds(metrics::QUEUE, self.sent - self.accepted);
            }
        }
    }
}

/// Why an attempt failed, and whose fault it was.
struct AttemptError {
    status: Status,
    fault: Fault,
}

impl From<Status> for AttemptError {
    fn from(status: Status) -> Self {
        AttemptError { status, fault: Fault::Request }
    }
}

/// Whether a worker marked `s` as caused by a failed KV transfer (`FAULT_METADATA`).
fn kv_fault(s: &Status) -> bool {
    s.metadata().get(tandem_proto::FAULT_METADATA).is_some_and(|v| v == "kv")
}

/// A worker's error as an attempt's failure: the worker's fault (the choice may move)
/// unless it is the request's (invalid, refused for load, deadline).
fn failed(role: &str, id: &WorkerId, e: Status) -> AttemptError {
    let status = worker_error(role, id, e);
    let fault = if status.code() == tonic::Code::Unavailable { Fault::Worker(id.clone()) } else { Fault::Request };
    AttemptError { status, fault }
}

/// A worker that left the cluster's view while the choice waited on it.
fn left(role: &str, id: &WorkerId) -> AttemptError {
    let status = Status::unavailable(format!("{role} worker {id} left the cluster (its lease ended)"));
    AttemptError { status, fault: Fault::Worker(id.clone()) }
}

async fn choice(
    s: &Arc<RouterState>,
    v: &Validated,
    index: u32,
    out: &mpsc::Sender<Result<Chunk, Status>>,
    accepted: Instant,
) -> Result<(), Status> {
    let policy = v.kv_failure_policy.unwrap_or(s.kv_failure_policy);
    let mut generated = Vec::new();
    let mut excluded = Vec::new();
    let mut plan = Plan::Route;
    let (mut migrations, mut kv_recoveries, mut overflows) = (0, 0, 0);
    // Decode workers found full since the last wait for room; tried again after it.
    let mut full: Vec<WorkerId> = Vec::new();
    // Since when the choice has been waiting for KV room (every decode worker full), and
    // how many times it has looked since.
    let (mut wait_since, mut rounds): (Option<Instant>, u32) = (None, 0);
    loop {
        let avoid: Vec<WorkerId> = excluded.iter().chain(&full).cloned().collect();
        let started = Instant::now();
        let result = attempt(s, v, index, out, accepted, &mut generated, &avoid, &plan).await;
        if !matches!(&result, Err(AttemptError { fault: Fault::Full(_), .. })) {
            // Whatever this attempt held is being freed: the longest-waiting choice (tokio's
            // `Notify` wakes in the order waiters registered) tries again. One per ending
            // attempt, not all: a herd of retries would each cost a `Reserve`.
            s.kv_room.notify_one();
            if let Some(since) = wait_since.take() {
                // The wait ended when this attempt found room.
                metrics::seconds(metrics::ROOM_WAIT, started - since);
                rounds = 0;
            }
        }
        let err = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let other_prefill = match &err.fault {
            Fault::Kv { prefill, .. } => s.members.has_other_prefill(&s.facts.name, prefill, &excluded),
            _ => false,
        };
        let other_decode = match &err.fault {
            Fault::Full(decode) => s.members.has_other_decode(&s.facts.name, decode, &avoid),
            _ => false,
        };
        let budget = Budget {
            migrations_left: s.migration_limit.saturating_sub(migrations),
            kv_recoveries_left: recovery::MAX_KV_RECOVERIES.saturating_sub(kv_recoveries),
            overflows_left: recovery::MAX_OVERFLOWS.saturating_sub(overflows),
            other_prefill,
            other_decode,
            // A worker that answered "full" judged the prompt able to fit its whole pool (it
            // refuses one that cannot as INVALID_ARGUMENT), so waiting can help.
            may_wait: !s.kv_wait.is_zero() && wait_since.is_none_or(|t| t.elapsed() < s.kv_wait),
        };
        let decision = recovery::next(&err.fault, policy, budget);
        if let Fault::Kv { .. } = err.fault {
            let action = match &decision {
                Next::Again { kind: Recovery::Kv(p), .. } => p.as_str(),
                _ if policy == KvFailurePolicy::Fail => "fail",
                _ => "gave_up",
            };
            metrics::kv_failure(policy.as_str(), action);
        }
        match decision {
            Next::GiveUp => {
                let status = match err.fault {
                    Fault::Kv { .. } => Status::unavailable(format!(
                        "{} (KV failure policy {policy}{})",
                        err.status.message(),
                        if policy == KvFailurePolicy::Fail { "" } else { "; no recovery left" }
                    )),
                    Fault::Full(_) => {
                        let mut st = Status::resource_exhausted(match wait_since {
                            Some(since) => {
                                metrics::seconds(metrics::ROOM_WAIT, since.elapsed());
                                format!(
                                    "{} (no decode worker had room within {:.1} s)",
                                    err.status.message(),
                                    since.elapsed().as_secs_f64()
                                )
                            }
                            None => err.status.message().to_string(),
                        });
                        st.metadata_mut().insert("retry-after", tonic::metadata::MetadataValue::from_static("1"));
                        st
                    }
                    _ => err.status,
                };
                return Err(status);
            }
            Next::WaitForRoom => {
                let since = *wait_since.get_or_insert_with(|| {
                    tracing::info!(
                        request = ?v.request_id,
                        choice = index,
                        reason = err.status.message(),
                        limit = ?s.kv_wait,
                        "every decode worker is full; waiting for KV room"
                    );
                    metrics::waited_for_room();
                    Instant::now()
                });
                rounds += 1;
                // Woken when any attempt ends; polled in case blocks are freed some other
                // way (a reservation's lease ending, another router's request).
                let poll = Duration::from_millis(20 << rounds.min(5)).min(s.kv_wait.saturating_sub(since.elapsed()));
                let _waiting = WaitingForRoom::new(s);
                tokio::select! {
                    _ = s.kv_room.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
                full.clear();
                overflows = 0;
                plan = Plan::Route;
            }
            Next::Again { plan: next_plan, exclude, kind } => {
                let (request, error, tokens) = (&v.request_id, err.status.message(), generated.len());
                match (kind, &next_plan) {
                    (Recovery::Migration, _) => {
                        migrations += 1;
                        metrics::migration();
                        let (migration, limit) = (migrations, s.migration_limit);
                        tracing::warn!(
                            request = ?request, choice = index, error, tokens, migration, limit,
                            "migrating to another worker"
                        );
                    }
                    (Recovery::Kv(_), Plan::Recompute { on }) => {
                        kv_recoveries += 1;
                        tracing::warn!(
                            request = ?request, choice = index, error, tokens, %policy, on = %on,
                            "KV transfer failed; recomputing on the decode worker"
                        );
                    }
                    (Recovery::Overflow, _) => {
                        overflows += 1;
                        tracing::info!(
                            request = ?request, choice = index, reason = error, tokens,
                            "decode worker full; trying another decode worker"
                        );
                    }
                    (Recovery::Kv(_), Plan::Route) => {
                        kv_recoveries += 1;
                        tracing::warn!(
                            request = ?request, choice = index, error, tokens, %policy,
                            "KV transfer failed; retrying on another prefill worker"
                        );
                    }
                }
                match kind {
                    Recovery::Overflow => full.extend(exclude),
                    _ => excluded.extend(exclude),
                }
                plan = next_plan;
            }
        }
    }
}

/// A choice between two looks for KV room (counted in `RouterState::kv_waiting` while it
/// lives, so a choice dropped mid-wait is uncounted too).
struct WaitingForRoom(Arc<RouterState>);

impl WaitingForRoom {
    fn new(s: &Arc<RouterState>) -> Self {
        let n = s.kv_waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        metrics::set_waiting_for_room(n);
        WaitingForRoom(s.clone())
    }
}

impl Drop for WaitingForRoom {
    fn drop(&mut self) {
        let n = self.0.kv_waiting.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) - 1;
        metrics::set_waiting_for_room(n);
    }
}

/// One try at a choice: on fresh workers (or as `plan` says), from the prompt plus what
/// earlier tries generated (`generated`, which this extends as tokens go out).
#[allow(clippy::too_many_arguments)]
async fn attempt(
    s: &Arc<RouterState>,
    v: &Validated,
    index: u32,
    out: &mpsc::Sender<Result<Chunk, Status>>,
    accepted: Instant,
    generated: &mut Vec<u32>,
    excluded: &[WorkerId],
    plan: &Plan,
) -> Result<(), AttemptError> {
    let rid = s.next_rid();
    let resumed = generated.len() as u32;
    let mut sampling = v.sampling.clone();
    sampling.seed = sampling.seed.map(|x| x.wrapping_add(index as u64));
    sampling.max_tokens = sampling.max_tokens.saturating_sub(resumed).max(1);
    if resumed > 0 {
        // Scored on the first try.
        sampling.prompt_logprobs = None;
    }
    let prompt: Vec<u32> = v.prompt.iter().chain(generated.iter()).copied().collect();
    let (route, recompute) = match plan {
        Plan::Route => (s.members.route(s.policy.as_ref(), &s.facts.name, prompt.len(), excluded)?, false),
        Plan::Recompute { on } => match s.members.decoder(on) {
            Some(w) => (Route::Local(w), true),
            None => return Err(left("decode", on)),
        },
    };
    match route {
        Route::Local(w) => {
            let mut c = w.client.clone();
            let mut guard = CancelOnDrop { rid, clients: vec![c.clone()], done: false };
            let req = pb::DecodeRequest {
                request_id: rid,
                sampling: Some(sampling),
                resumed_tokens: resumed,
                prompt_token_ids: prompt,
                cache_salt: v.cache_salt.clone(),
                priority: v.priority,
                recompute,
            };
            let marks = Marks { accepted, sent: Instant::now(), prefilled: None };
            let stream = tokio::select! {
                r = c.decode(req) => r.map_err(|e| failed("decode", &w.id, e))?.into_inner(),
                _ = w.gone.cancelled() => return Err(left("decode", &w.id)),
            };
            guard.done = relay(stream, index, None, out, &w, None, marks, generated).await?;
            Ok(())
        }
        Route::Disaggregated { prefill, decode } => {
            let (mut dc, mut pc) = (decode.client.clone(), prefill.client.clone());
            let reserve = pb::ReserveRequest {
                request_id: rid,
                prompt_token_ids: prompt.clone(),
                cache_salt: v.cache_salt.clone(),
                lease_ms: s.kv_lease.as_millis() as u32,
                max_tokens: sampling.max_tokens,
                priority: v.priority,
                sampling: Some(sampling.clone()),
                resumed_tokens: resumed,
                sender_lease: prefill.lease,
            };
            // Armed before the reservation: a choice dropped while `Reserve` is in flight still
            // cancels it (a reservation that lands after the `Cancel` is abandoned by the
            // worker when no `Decode` attaches to it).
            let mut guard = CancelOnDrop { rid, clients: vec![dc.clone(), pc.clone()], done: false };
            let res = tokio::select! {
                r = dc.reserve(reserve) => r.map_err(|e| {
                    let mut err = failed("decode", &decode.id, e);
                    if err.status.code() == tonic::Code::ResourceExhausted {
                        // This worker's pool is full; another decode worker may have room.
                        err.fault = Fault::Full(decode.id.clone());
                    }
                    err
                })?.into_inner(),
                _ = decode.gone.cancelled() => return Err(left("decode", &decode.id)),
            };
            let dreq = pb::DecodeRequest {
                request_id: rid,
                sampling: Some(sampling.clone()),
                resumed_tokens: resumed,
                ..Default::default()
            };
            let stream = tokio::select! {
                r = dc.decode(dreq) => r.map_err(|e| failed("decode", &decode.id, e))?.into_inner(),
                _ = decode.gone.cancelled() => return Err(left("decode", &decode.id)),
            };
            let preq = pb::PrefillRequest {
                request_id: rid,
                prompt_token_ids: prompt,
                sampling: Some(sampling),
                cache_salt: v.cache_salt.clone(),
                destination: Some(pb::KvDestination {
                    worker_id: decode.id.to_string(),
                    endpoints: res.kv_endpoints,
                    block_ids: res.block_ids,
                    cached_blocks: res.cached_blocks,
                    layout: res.layout,
                    lease_ms: res.lease_ms,
                }),
                priority: v.priority,
                resumed_tokens: resumed,
            };
            let sent = Instant::now();
            let kv_failed = |status: Status, prefill_failed: bool| AttemptError {
                status,
                fault: Fault::Kv { prefill: prefill.id.clone(), decode: decode.id.clone(), prefill_failed },
            };
            let pres = tokio::select! {
                r = pc.prefill(preq) => match r {
                    Ok(r) => r.into_inner(),
                    Err(e) => {
                        let kv = kv_fault(&e);
                        let err = failed("prefill", &prefill.id, e);
                        return Err(match err.fault {
                            // The transfer broke: the policy decides.
                            Fault::Worker(_) if kv => kv_failed(err.status, false),
                            // The prefill worker died or failed: its KV never arrives whole.
                            Fault::Worker(_) => kv_failed(err.status, true),
                            _ => err,
                        });
                    }
                },
                _ = prefill.gone.cancelled() => return Err(kv_failed(left("prefill", &prefill.id).status, true)),
                _ = decode.gone.cancelled() => return Err(left("decode", &decode.id)),
            };
            let marks = Marks { accepted, sent, prefilled: Some(Instant::now()) };
            guard.done = relay(stream, index, Some(pres), out, &decode, Some(&prefill.id), marks, generated).await?;
            Ok(())
        }
    }
}

/// Forwards a decode stream as chunks of choice `index`, appending its tokens to
/// `generated`. Returns true once the choice finished, false if the client left first.
#[allow(clippy::too_many_arguments)]
async fn relay(
    mut stream: tonic::Streaming<pb::DecodeResponse>,
    index: u32,
    mut prefill: Option<pb::PrefillResponse>,
    out: &mpsc::Sender<Result<Chunk, Status>>,
    worker: &Picked,
    prefilled_by: Option<&WorkerId>,
    marks: Marks,
    generated: &mut Vec<u32>,
) -> Result<bool, AttemptError> {
    let decode = &worker.id;
    let mut first = true;
    let resumed = !generated.is_empty();
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = out.closed() => return Ok(false),
            _ = worker.gone.cancelled() => return Err(left("decode", decode)),
        };
        let d = match msg {
            Ok(Some(d)) => d,
            Ok(None) => {
                let status = Status::unavailable(format!("decode worker {decode} ended the stream early"));
                return Err(AttemptError { status, fault: Fault::Worker(decode.clone()) });
            }
            // The KV never arrived whole (the prefill side reports it too, usually first).
            Err(e) if first && kv_fault(&e) && prefilled_by.is_some() => {
                let prefill = prefilled_by.expect("checked").clone();
                let status = worker_error("decode", decode, e);
                return Err(AttemptError {
                    status,
                    fault: Fault::Kv { prefill, decode: decode.clone(), prefill_failed: false },
                });
            }
            Err(e) => return Err(failed("decode", decode, e)),
        };
        let finish = d.finish_reason();
        let mut logprobs = d.logprobs;
        let mut prompt_logprobs = d.prompt_logprobs;
        let mut cached_tokens = d.cached_tokens;
        if first {
            if !resumed && !d.token_ids.is_empty() {
                marks.first_token(prefill.as_ref());
            }
            if let Some(p) = prefill.as_mut() {
                // The prefill worker drew the first token; its log-probabilities came with it.
                if let Some(lp) = p.logprobs.clone() {
                    if logprobs.len() < d.token_ids.len() {
                        logprobs.insert(0, lp);
                    }
                }
                prompt_logprobs = std::mem::take(&mut p.prompt_logprobs);
                cached_tokens = p.cached_tokens;
            }
        }
        generated.extend(&d.token_ids);
        let chunk = Chunk {
            index,
            text: d.text,
            token_ids: d.token_ids,
            logprobs,
            finish,
            prefill: if first && !resumed { prefill.take() } else { None },
            prompt_logprobs,
            cached_tokens: if first && !resumed { cached_tokens } else { 0 },
        };
        first = false;
        if out.send(Ok(chunk)).await.is_err() {
            return Ok(false);
        }
        if finish != api::FinishReason::Unspecified {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_the_worker_sent_is_the_requests_and_a_cut_stream_is_the_workers() {
        let id = WorkerId::new("decode-0").unwrap();
        let sent = failed("decode", &id, Status::cancelled("cancelled: by the operator"));
        assert_eq!(sent.status.code(), tonic::Code::Cancelled);
        assert!(matches!(sent.fault, Fault::Request), "the worker's own CANCELLED is not retried elsewhere");
        // What tonic makes of a connection the dying worker dropped: CANCELLED, caused by hyper.
        let mut cut = Status::cancelled("operation was canceled");
        cut.set_source(Arc::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)));
        let cut = failed("decode", &id, cut);
        assert_eq!(cut.status.code(), tonic::Code::Unavailable, "{:?}", cut.status);
        assert!(matches!(cut.fault, Fault::Worker(ref w) if *w == id), "the choice moves to another worker");
    }
}
