//! The public `tandem.v1.Generate` service.
//!
//! One request: validate and tokenize; for each of its `n` choices pick a
//! (prefill, decode) pair, reserve the prompt's blocks on the decode worker,
//! open the decode stream, have the prefill worker compute the prompt and ship
//! its KV, then relay the decode stream. Choices run concurrently and their
//! chunks interleave on the client's stream. A client that leaves cancels every
//! choice on every worker; a deadline ends the request with DEADLINE_EXCEEDED.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::WorkerId;
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::v1::generate_server::Generate;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::members::{Members, Picked, Route};
use crate::metrics;
use crate::policy::RoutingPolicy;
use crate::recovery::{self, Budget, Fault, KvFailurePolicy, Next, Plan, Recovery};
use crate::validate::{check_model, input_ids, validate, ModelFacts, Validated};

/// How long a decode worker holds a prompt's blocks for KV that does not come, by default.
pub const KV_LEASE: Duration = Duration::from_secs(30);

/// State shared by the router's handlers.
pub struct RouterState {
    pub facts: ModelFacts,
    pub members: Arc<Members>,
    pub policy: Box<dyn RoutingPolicy>,
    /// Requests in flight at most; beyond, RESOURCE_EXHAUSTED.
    pub max_inflight: usize,
    pub inflight: AtomicUsize,
    pub draining: AtomicBool,
    /// When the model was loaded (OpenAI `created`).
    pub created: i64,
    /// Accepted API keys; empty: the API is open.
    pub api_keys: Vec<String>,
    /// Times a choice may move to other workers after a worker fails under it.
    pub migration_limit: usize,
    /// What a request whose KV transfer fails gets when it does not choose.
    pub kv_failure_policy: KvFailurePolicy,
    /// The lease of a reservation (see `KV_LEASE`).
    pub kv_lease: Duration,
    next_id: AtomicU64,
}

impl RouterState {
    pub fn new(facts: ModelFacts, members: Arc<Members>, policy: Box<dyn RoutingPolicy>, max_inflight: usize) -> Self {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
            as u64
            ^ ((std::process::id() as u64) << 40);
        RouterState {
            facts,
            members,
            policy,
            max_inflight,
            inflight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            api_keys: Vec::new(),
            migration_limit: 3,
            kv_failure_policy: KvFailurePolicy::Retry,
            kv_lease: KV_LEASE,
            // Workers see ids from every router: start somewhere random.
            next_id: AtomicU64::new(splitmix(seed)),
        }
    }

    fn next_rid(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A request admitted past the in-flight limit; releases its slot when dropped.
pub struct Permit(Arc<RouterState>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn admit(s: &Arc<RouterState>) -> Result<Permit, Status> {
    if s.draining.load(Ordering::SeqCst) {
        return Err(Status::unavailable("the router is shutting down"));
    }
    let n = s.inflight.fetch_add(1, Ordering::SeqCst);
    let permit = Permit(s.clone());
    if n >= s.max_inflight {
        let mut st = Status::resource_exhausted(format!(
            "the router has {} requests in flight, its limit; retry later",
            s.max_inflight
        ));
        // As HTTP's Retry-After: seconds to wait before trying again.
        st.metadata_mut().insert("retry-after", tonic::metadata::MetadataValue::from_static("1"));
        return Err(st);
    }
    Ok(permit)
}

/// The `grpc-timeout` header as a duration (`100m`, `5S`, ...).
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A worker's error as the client should see it: the worker named, client errors
/// kept, everything else UNAVAILABLE (the cluster could not serve it).
fn worker_error(role: &str, id: &WorkerId, s: Status) -> Status {
    let msg = format!("{role} worker {id}: {}", s.message());
    match s.code() {
        tonic::Code::InvalidArgument => Status::invalid_argument(msg),
        tonic::Code::ResourceExhausted => Status::resource_exhausted(msg),
        tonic::Code::DeadlineExceeded => Status::deadline_exceeded(msg),
        tonic::Code::Cancelled => Status::cancelled(msg),
        _ => Status::unavailable(msg),
    }
}

/// One chunk of one choice, on its way to the client.
struct Chunk {
    index: u32,
    text: String,
    token_ids: Vec<u32>,
    logprobs: Vec<api::TokenLogprobs>,
    finish: i32,
    prefill: Option<pb::PrefillResponse>,
    prompt_logprobs: Vec<api::TokenLogprobs>,
    /// Prompt tokens served from a prefix cache (first chunk only).
    cached_tokens: u32,
}

/// Sends Cancel to the workers of a choice that did not finish (client gone, error).
struct CancelOnDrop {
    rid: u64,
    clients: Vec<WorkerClient<Channel>>,
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

async fn run_choice(
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

/// Workers mark a status whose cause is a failed KV transfer with this metadata key
/// (value `kv`; `tandem_decode_worker::service::kv_fault`), so the router can tell a
/// broken transfer from a broken worker.
const FAULT_METADATA: &str = "tandem-fault";

fn kv_fault(s: &Status) -> bool {
    s.metadata().get(FAULT_METADATA).is_some_and(|v| v == "kv")
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
    loop {
        let err = match attempt(s, v, index, out, accepted, &mut generated, &excluded, &plan).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let other_prefill = match &err.fault {
            Fault::Kv { prefill, .. } => s.members.has_other_prefill(&s.facts.name, prefill, &excluded),
            _ => false,
        };
        let other_decode = match &err.fault {
            Fault::Full(decode) => s.members.has_other_decode(&s.facts.name, decode, &excluded),
            _ => false,
        };
        let budget = Budget {
            migrations_left: s.migration_limit.saturating_sub(migrations),
            kv_recoveries_left: recovery::MAX_KV_RECOVERIES.saturating_sub(kv_recoveries),
            overflows_left: recovery::MAX_OVERFLOWS.saturating_sub(overflows),
            other_prefill,
            other_decode,
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
                    _ => err.status,
                };
                return Err(status);
            }
            Next::Again { plan: next_plan, exclude, kind } => {
                let what = match (kind, &next_plan) {
                    (Recovery::Migration, _) => {
                        migrations += 1;
                        metrics::migration();
                        format!("migrating after {} tokens ({migrations} of {})", generated.len(), s.migration_limit)
                    }
                    (Recovery::Kv(_), Plan::Recompute { on }) => {
                        kv_recoveries += 1;
                        format!("KV failure policy {policy}: recomputing on {on} after {} tokens", generated.len())
                    }
                    (Recovery::Overflow, _) => {
                        overflows += 1;
                        format!("trying another decode worker after {} tokens", generated.len())
                    }
                    (Recovery::Kv(_), Plan::Route) => {
                        kv_recoveries += 1;
                        format!(
                            "KV failure policy {policy}: retrying on another prefill worker after {} tokens",
                            generated.len()
                        )
                    }
                };
                eprintln!("router: request {} choice {index}: {}; {what}", v.request_id, err.status.message());
                excluded.extend(exclude);
                plan = next_plan;
            }
        }
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
            // cancels it (the worker refuses a reservation for an id it saw cancelled).
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
        let mut logprobs = d.logprobs;
        let finish = d.finish_reason;
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
        if finish != api::FinishReason::Unspecified as i32 {
            return Ok(true);
        }
    }
}

/// Per-choice bookkeeping for timing and usage.
#[derive(Default, Clone)]
struct ChoiceClock {
    first: Option<Instant>,
    /// When the last chunk with tokens went out.
    last: Option<Instant>,
    tokens: u32,
    prefill: Option<pb::PrefillTiming>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs every choice of `v` and streams their chunks to `tx` until all finish, one
/// fails, the deadline passes or the client leaves.
async fn run_request(
    s: Arc<RouterState>,
    v: Arc<Validated>,
    tx: mpsc::Sender<Result<api::GenerateStreamResponse, Status>>,
    accepted: Instant,
    deadline: Option<Duration>,
    _permit: Permit,
    api: &'static str,
) {
    let (ctx, mut crx) = mpsc::channel(64);
    let mut choices = JoinSet::new();
    for i in 0..v.n {
        choices.spawn(run_choice(s.clone(), v.clone(), i, ctx.clone(), accepted));
    }
    drop(ctx);
    let mut clocks = vec![ChoiceClock::default(); v.n as usize];
    let mut remaining = v.n;
    let mut cached_tokens = 0;
    let end = deadline.map(|d| tokio::time::Instant::now() + d);
    loop {
        let next = tokio::select! {
            c = crx.recv() => c,
            _ = tx.closed() => {
                // The client left: dropping `choices` cancels them.
                metrics::request_done(api, "cancelled");
                return;
            }
            _ = async { match end { Some(e) => tokio::time::sleep_until(e).await, None => std::future::pending().await } } => {
                metrics::request_done(api, "deadline_exceeded");
                let _ = tx.send(Err(Status::deadline_exceeded("the request's deadline passed"))).await;
                return;
            }
        };
        let chunk = match next {
            None => {
                metrics::request_done(api, "internal");
                return;
            }
            Some(Err(status)) => {
                metrics::request_done(api, metrics::error_kind(status.code()));
                let _ = tx.send(Err(status)).await;
                return;
            }
            Some(Ok(c)) => c,
        };
        let now = Instant::now();
        let clock = &mut clocks[chunk.index as usize];
        let first = clock.first.is_none();
        match clock.last {
            None if !chunk.token_ids.is_empty() => metrics::seconds(metrics::TTFT, now - accepted),
            Some(last) if !chunk.token_ids.is_empty() => {
                let per = (now - last) / chunk.token_ids.len() as u32;
                for _ in 0..chunk.token_ids.len() {
                    metrics::seconds(metrics::ITL, per);
                }
            }
            _ => {}
        }
        if !chunk.token_ids.is_empty() {
            clock.last = Some(now);
        }
        metrics::generated(chunk.token_ids.len());
        clock.first.get_or_insert(now);
        clock.tokens += chunk.token_ids.len() as u32;
        if let Some(p) = &chunk.prefill {
            clock.prefill = p.timing;
        }
        if chunk.index == 0 && chunk.cached_tokens > 0 {
            cached_tokens = chunk.cached_tokens;
        }
        let finished = chunk.finish != api::FinishReason::Unspecified as i32;
        let timing = if finished {
            let f = clock.first.expect("set above");
            let p = clock.prefill.unwrap_or_default();
            let decode = now - f;
            Some(api::Timing {
                time_to_first_token_ms: ms(f - accepted),
                queue_time_ms: p.queue_time_ms,
                prefill_time_ms: p.compute_time_ms,
                kv_transfer_time_ms: p.kv_transfer_tail_ms,
                decode_time_ms: ms(decode),
                mean_inter_token_ms: if clock.tokens > 1 { ms(decode) / (clock.tokens - 1) as f64 } else { 0.0 },
                total_time_ms: ms(now - accepted),
            })
        } else if first {
            Some(api::Timing { time_to_first_token_ms: ms(now - accepted), ..Default::default() })
        } else {
            None
        };
        if finished {
            remaining -= 1;
        }
        let usage = (finished && remaining == 0).then(|| {
            let completion: u32 = clocks.iter().map(|c| c.tokens).sum();
            api::Usage {
                prompt_tokens: v.prompt.len() as u32,
                completion_tokens: completion,
                total_tokens: v.prompt.len() as u32 + completion,
                cached_tokens,
            }
        });
        let resp = api::GenerateStreamResponse {
            index: chunk.index,
            text: chunk.text,
            token_ids: chunk.token_ids,
            logprobs: chunk.logprobs,
            finish_reason: chunk.finish,
            usage,
            timing,
            request_id: v.request_id.clone(),
            model: s.facts.name.clone(),
            prompt_logprobs: chunk.prompt_logprobs,
        };
        if tx.send(Ok(resp)).await.is_err() {
            metrics::request_done(api, "cancelled");
            return;
        }
        if remaining == 0 {
            metrics::seconds(metrics::E2E, now - accepted);
            metrics::request_done(api, "none");
            return;
        }
    }
}

#[derive(Clone)]
pub struct GenerateService(pub Arc<RouterState>);

/// The tenant an authenticated request belongs to; its prefix-cache entries are its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

/// The tenant of API key `given` among the configured `keys`, if it is one of them. A
/// configured key is `KEY` (its own tenant, named after a hash of the key) or
/// `TENANT:KEY` (keys sharing a tenant share its prefix cache).
pub fn tenant_of(keys: &[String], given: &str) -> Option<Tenant> {
    keys.iter().find_map(|entry| {
        let (tenant, key) = match entry.split_once(':') {
            Some((t, k)) if !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') => {
                (t.to_string(), k)
            }
            _ => (
                format!(
                    "key-{:016x}",
                    splitmix(
                        entry
                            .bytes()
                            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
                    )
                ),
                entry.as_str(),
            ),
        };
        (key == given).then_some(Tenant(tenant))
    })
}

/// The prefix-cache salt a request runs with: set by the server from the tenant when keys
/// are configured, so no client-sent salt reaches another tenant's blocks; the client's
/// salt then only subdivides its own tenant's cache.
pub fn effective_salt(tenant: Option<&Tenant>, client: Option<&str>) -> Option<String> {
    match tenant {
        Some(Tenant(t)) => Some(format!("tenant:{t}|{}", client.unwrap_or(""))),
        None => client.map(str::to_string),
    }
}

/// gRPC's `authorization: Bearer <key>` metadata against the configured keys; the caller's
/// tenant goes into the request's extensions.
pub fn check_api_key(keys: &[String], req: &mut tonic::Request<()>) -> Result<(), Status> {
    if keys.is_empty() {
        return Ok(());
    }
    let given = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given.and_then(|k| tenant_of(keys, k)) {
        Some(t) => {
            req.extensions_mut().insert(t);
            Ok(())
        }
        None => Err(Status::unauthenticated("a valid API key is required (authorization: Bearer <key>)")),
    }
}

/// A generation's chunks as they come; dropping the receiver cancels the request.
pub type Chunks = mpsc::Receiver<Result<api::GenerateStreamResponse, Status>>;

impl GenerateService {
    fn start(&self, req: Request<api::GenerateRequest>) -> Result<Chunks, Status> {
        // tonic's transport answers CANCELLED when the client's deadline passes; end the
        // request a little earlier so the client hears DEADLINE_EXCEEDED from us instead.
        let deadline = grpc_timeout(req.metadata()).map(|d| d.saturating_sub(d / 20 + Duration::from_millis(5)));
        let tenant = req.extensions().get::<Tenant>().cloned();
        start_request(&self.0, req.get_ref(), deadline, "grpc", tenant.as_ref())
    }
}

/// Checks `req`, admits it and starts it: every front door (gRPC, HTTP) goes through here.
pub fn start_request(
    s: &Arc<RouterState>,
    req: &api::GenerateRequest,
    deadline: Option<Duration>,
    api: &'static str,
    tenant: Option<&Tenant>,
) -> Result<Chunks, Status> {
    let accepted = Instant::now();
    let salted;
    let req = if tenant.is_some() {
        let mut r = req.clone();
        r.cache_salt = effective_salt(tenant, req.cache_salt.as_deref());
        salted = r;
        &salted
    } else {
        req
    };
    // A bad request is the client's to fix whatever the load: check it first.
    let checked = validate(req, &s.facts, || format!("req-{:016x}", splitmix(s.next_rid())))
        .and_then(|v| admit(s).map(|p| (v, p)));
    let (v, permit) = match checked {
        Ok(x) => x,
        Err(e) => {
            metrics::request_done(api, metrics::error_kind(e.code()));
            return Err(e);
        }
    };
    metrics::tokens(v.prompt.len());
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run_request(s.clone(), Arc::new(v), tx, accepted, deadline, permit, api));
    Ok(rx)
}

#[tonic::async_trait]
impl Generate for GenerateService {
    async fn generate(&self, req: Request<api::GenerateRequest>) -> Result<Response<api::GenerateResponse>, Status> {
        let mut rx = self.start(req)?;
        let mut resp = api::GenerateResponse::default();
        let mut choices: Vec<api::Choice> = Vec::new();
        while let Some(msg) = rx.recv().await {
            let m = msg?;
            resp.request_id = m.request_id;
            resp.model = m.model;
            if let Some(u) = m.usage {
                resp.usage = Some(u);
            }
            let c = match choices.iter_mut().find(|c| c.index == m.index) {
                Some(c) => c,
                None => {
                    choices.push(api::Choice { index: m.index, ..Default::default() });
                    choices.last_mut().expect("just pushed")
                }
            };
            c.text.push_str(&m.text);
            c.token_ids.extend(m.token_ids);
            c.logprobs.extend(m.logprobs);
            c.prompt_logprobs.extend(m.prompt_logprobs);
            if m.finish_reason != 0 {
                c.finish_reason = m.finish_reason;
                c.timing = m.timing;
            }
        }
        if choices.iter().any(|c| c.finish_reason == 0) || resp.usage.is_none() {
            return Err(Status::internal("the generation ended before every choice finished"));
        }
        choices.sort_by_key(|c| c.index);
        resp.choices = choices;
        Ok(Response::new(resp))
    }

    type GenerateStreamStream = ReceiverStream<Result<api::GenerateStreamResponse, Status>>;

    async fn generate_stream(
        &self,
        req: Request<api::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        Ok(Response::new(ReceiverStream::new(self.start(req)?)))
    }

    async fn tokenize(&self, req: Request<api::TokenizeRequest>) -> Result<Response<api::TokenizeResponse>, Status> {
        let f = &self.0.facts;
        let r = req.into_inner();
        check_model(&r.model, f)?;
        let input = r.input.map(|i| match i {
            api::tokenize_request::Input::Prompt(p) => api::generate_request::Input::Prompt(p),
            api::tokenize_request::Input::Messages(m) => api::generate_request::Input::Messages(m),
        });
        let (mut ids, rendered) = input_ids(input.as_ref(), f, r.add_generation_prompt.unwrap_or(true))?;
        if !r.add_special_tokens.unwrap_or(true)
            && f.tokenizer.add_bos()
            && ids.first() == f.tokenizer.bos_id().as_ref()
        {
            ids.remove(0);
        }
        let token_strs = if r.return_token_strs {
            ids.iter().map(|&t| f.tokenizer.token_str(t).unwrap_or_default().to_string()).collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(api::TokenizeResponse {
            count: ids.len() as u32,
            token_ids: ids,
            max_model_len: f.max_model_len as u32,
            token_strs,
            rendered_prompt: rendered,
        }))
    }

    async fn list_models(
        &self,
        _req: Request<api::ListModelsRequest>,
    ) -> Result<Response<api::ListModelsResponse>, Status> {
        let models = self
            .0
            .members
            .models()
            .into_iter()
            .map(|(id, ctx)| api::Model { id, owned_by: "tandem".into(), created: self.0.created, max_model_len: ctx })
            .collect();
        Ok(Response::new(api::ListModelsResponse { models }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_tenants_and_salts_keep_tenants_apart() {
        let keys = vec!["sk-plain".to_string(), "acme:sk-a1".to_string(), "acme:sk-a2".to_string()];
        let plain = tenant_of(&keys, "sk-plain").unwrap();
        assert!(plain.0.starts_with("key-"));
        assert_eq!(tenant_of(&keys, "sk-a1"), Some(Tenant("acme".into())));
        assert_eq!(tenant_of(&keys, "sk-a1"), tenant_of(&keys, "sk-a2"), "keys of one tenant share it");
        assert_eq!(tenant_of(&keys, "acme:sk-a1"), None, "the tenant is not part of the key");
        assert_eq!(tenant_of(&keys, "sk-nope"), None);
        let acme = Tenant("acme".into());
        // A client cannot pick another tenant's salt: the server's comes first.
        assert_ne!(effective_salt(Some(&plain), Some("x")), effective_salt(Some(&acme), Some("x")));
        assert_ne!(effective_salt(Some(&plain), Some("tenant:acme|x")), effective_salt(Some(&acme), Some("x")));
        assert_eq!(effective_salt(None, Some("x")).as_deref(), Some("x"), "open API: the client's salt as is");
    }
}
