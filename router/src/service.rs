//! The public `tandem.v1.Generate` service.
//!
//! One request: validate and tokenize; for each of its `n` choices pick a
//! (prefill, decode) pair, reserve the prompt's blocks on the decode worker,
//! open the decode stream, have the prefill worker compute the prompt and ship
//! its KV, then relay the decode stream. Choices run concurrently and their
//! chunks interleave on the client's stream. A client that leaves cancels every
//! choice on every worker; a deadline ends the request with DEADLINE_EXCEEDED; a
//! client that reads nothing of its stream for `--stream-stall-timeout` has its
//! request cancelled (`stall`). Admission holds a slot of `--max-inflight` and one of
//! the caller's tenant (`quota`) for the request's whole life.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::v1::generate_server::Generate;
use tandem_proto::tandem::worker::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::choice::run_choice;
use crate::members::Members;
use crate::metrics;
use crate::policy::RoutingPolicy;
use crate::quota::{Quotas, TenantPermit, ANONYMOUS};
use crate::recovery::KvFailurePolicy;
use crate::salt::{effective_salt, SaltKey};
use crate::stall::{HandOff, Outbox, STREAM_STALL_TIMEOUT};
use crate::validate::{check_input_size, check_model, input_ids, validate, ModelFacts, Validated};

/// How long a decode worker holds a prompt's blocks for KV that does not come, by default.
pub const KV_LEASE: Duration = Duration::from_secs(30);
/// How long a choice waits for KV room when every decode worker's pool is full.
pub const KV_WAIT: Duration = Duration::from_secs(30);
/// How long a request may go without its first token, by default: past it, it is refused
/// as overloaded rather than left waiting in queues.
pub const FIRST_TOKEN_TIMEOUT: Duration = Duration::from_secs(300);

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
    /// How long a choice waits for a decode worker with room (see `KV_WAIT`); zero: refuse
    /// at once.
    pub kv_wait: Duration,
    /// Notified whenever a choice's attempt ends (its blocks are being freed): one choice
    /// waiting for KV room tries again.
    pub kv_room: tokio::sync::Notify,
    /// Choices waiting for KV room now.
    pub kv_waiting: AtomicUsize,
    /// How long a request may go without its first token (waiting for room, queued on a
    /// prefill worker, computing) before it is refused as overloaded and cancelled on its
    /// workers (see `FIRST_TOKEN_TIMEOUT`). The request's own deadline, if sooner, wins.
    pub first_token_timeout: Duration,
    /// Requests in flight per tenant, against each tenant's limit.
    pub quotas: Quotas,
    /// How long a stream may wait for its client to take the next chunk before the request
    /// is cancelled (see `stall`).
    pub stream_stall: Duration,
    /// Tokenizations and chat renders running at once, at most (see `RouterState::tokenize`).
    tokenizers: Arc<tokio::sync::Semaphore>,
    /// Keys the cache salts sent to workers (`salt::effective_salt`); random unless set.
    pub salt_key: SaltKey,
}

impl RouterState {
    pub fn new(facts: ModelFacts, members: Arc<Members>, policy: Box<dyn RoutingPolicy>, max_inflight: usize) -> Self {
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
            kv_wait: KV_WAIT,
            kv_room: tokio::sync::Notify::new(),
            kv_waiting: AtomicUsize::new(0),
            first_token_timeout: FIRST_TOKEN_TIMEOUT,
            quotas: Quotas::default(),
            stream_stall: STREAM_STALL_TIMEOUT,
            tokenizers: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            salt_key: SaltKey::random(),
        }
    }

    /// Runs `f` (tokenizing, rendering a chat template) on the blocking pool, as many at
    /// once as there are cores, never on the runtime's threads: a large input delays other
    /// inputs' tokenization, not `/health` or the streams in flight. A caller that goes
    /// away leaves `f` to finish, still counted.
    pub async fn tokenize<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&RouterState) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let permit = self.tokenizers.clone().acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
        let s = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&s)
        })
        .await
        .map_err(|e| Status::internal(format!("tokenizing failed: {e}")))
    }

    /// A new id for one attempt at a choice on the workers: random, so that nobody can
    /// name (and `Cancel`) a request before or while it runs, and unique across routers.
    pub(crate) fn next_rid(&self) -> u64 {
        random_u64()
    }
}

/// 64 bits from the operating system's random source.
fn random_u64() -> u64 {
    getrandom::u64().expect("the operating system's random source")
}

/// A new public request id: 128 random bits, unrelated to the workers' ids.
pub fn public_request_id() -> String {
    format!("req-{:016x}{:016x}", random_u64(), random_u64())
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A request admitted past the in-flight limit and its tenant's; releases both slots
/// when dropped, however the request ends.
pub struct Permit {
    state: Arc<RouterState>,
    _tenant: TenantPermit,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.state.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// RESOURCE_EXHAUSTED with `retry-after` metadata (as HTTP's Retry-After: seconds to wait).
fn overloaded(message: String) -> Status {
    let mut st = Status::resource_exhausted(message);
    st.metadata_mut().insert("retry-after", tonic::metadata::MetadataValue::from_static("1"));
    st
}

/// Takes a slot of the caller's tenant, then one of the router's. The tenant's comes first
/// so that a tenant over its limit never holds, even for a moment, a slot another tenant
/// could have had.
fn admit(s: &Arc<RouterState>, tenant: Option<&Tenant>) -> Result<Permit, Status> {
    if s.draining.load(Ordering::SeqCst) {
        return Err(Status::unavailable("the router is shutting down"));
    }
    let tenant = s.quotas.acquire(tenant.map_or(ANONYMOUS, |t| t.0.as_str())).map_err(|r| {
        metrics::admission_refused("tenant_limit");
        // Only the caller's own limit: nothing about other tenants.
        overloaded(format!(
            "your tenant has {} requests in flight, its limit (the per-tenant limit); retry later",
            r.limit
        ))
    })?;
    let n = s.inflight.fetch_add(1, Ordering::SeqCst);
    let permit = Permit { state: s.clone(), _tenant: tenant };
    if n >= s.max_inflight {
        metrics::admission_refused("max_inflight");
        return Err(overloaded(format!(
            "the router has {} requests in flight, its limit; retry later",
            s.max_inflight
        )));
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
/// fails, the deadline passes, the client leaves or stops reading.
async fn run_request(
    s: Arc<RouterState>,
    v: Arc<Validated>,
    tx: Outbox<Result<api::GenerateStreamResponse, Status>>,
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
    let deadline_passed = || async move {
        match end {
            Some(e) => tokio::time::sleep_until(e).await,
            None => std::future::pending().await,
        }
    };
    let past_deadline = |tx: &Outbox<_>| {
        metrics::request_done(api, "deadline_exceeded");
        tx.last(Err(Status::deadline_exceeded("the request's deadline passed")));
    };
    // Served or refused: no request waits for its first token longer than this.
    let first_by = tokio::time::Instant::now() + s.first_token_timeout;
    let mut started = false;
    loop {
        let next = tokio::select! {
            c = crx.recv() => c,
            _ = tokio::time::sleep_until(first_by), if !started => {
                metrics::request_done(api, "first_token_timeout");
                tracing::warn!(
                    request = ?v.request_id,
                    waited = ?s.first_token_timeout,
                    "no first token in time; refusing the request as overloaded"
                );
                tx.last(Err(overloaded(format!(
                    "no first token within {} s (--first-token-timeout): the cluster is overloaded; retry later",
                    s.first_token_timeout.as_secs_f64()
                ))));
                // Dropping `choices` cancels the request on its workers.
                return;
            }
            _ = tx.closed() => {
                // The client left: dropping `choices` cancels them.
                metrics::request_done(api, "cancelled");
                return;
            }
            _ = deadline_passed() => {
                past_deadline(&tx);
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
                tx.last(Err(status));
                return;
            }
            Some(Ok(c)) => c,
        };
        // The first chunk of any choice: the prompt is computed.
        started = true;
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
        let finished = chunk.finish != api::FinishReason::Unspecified;
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
            finish_reason: chunk.finish.into(),
            usage,
            timing,
            request_id: v.request_id.clone(),
            model: s.facts.name.clone(),
            prompt_logprobs: chunk.prompt_logprobs,
        };
        // A client that reads nothing is cut at the stall timeout, or at its deadline.
        let sent = tokio::select! {
            sent = tx.send(Ok(resp)) => sent,
            _ = deadline_passed() => {
                past_deadline(&tx);
                return;
            }
        };
        match sent {
            Ok(()) => {}
            Err(HandOff::Closed) => {
                metrics::request_done(api, "cancelled");
                return;
            }
            Err(HandOff::Stalled) => {
                // Returning drops `choices`: their workers get `Cancel` and free the blocks.
                stalled(api, &v.request_id, tx.stall());
                metrics::request_done(api, "cancelled");
                tx.last(Err(Status::cancelled(stall_message(tx.stall()))));
                return;
            }
        }
        if remaining == 0 {
            metrics::seconds(metrics::E2E, now - accepted);
            metrics::request_done(api, "none");
            return;
        }
    }
}

/// Logs and counts a stream cancelled because its client stopped reading (once per request).
pub fn stalled(api: &'static str, request_id: &str, stall: Duration) {
    metrics::stream_stalled(api);
    tracing::warn!(
        request = request_id,
        api,
        stall_secs = stall.as_secs_f64(),
        "the client took nothing of its stream for the stall timeout; cancelling the request"
    );
}

/// What a client whose stream stalled is told, should it read again.
pub fn stall_message(stall: Duration) -> String {
    format!(
        "the client read nothing of its stream for {} s (--stream-stall-timeout); the request was cancelled",
        stall.as_secs_f64()
    )
}

#[derive(Clone)]
pub struct GenerateService(pub Arc<RouterState>);

/// The tenant an authenticated request belongs to; its prefix-cache entries are its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

/// A configured key entry's tenant and key: `TENANT:KEY`, or a plain `KEY` as a tenant of its
/// own, named after a hash of the key.
fn split_key(entry: &str) -> (String, &str) {
    match entry.split_once(':') {
        Some((t, k)) if !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') => {
            (t.to_string(), k)
        }
        _ => (
            format!(
                "key-{:016x}",
                splitmix(
                    entry.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
                )
            ),
            entry,
        ),
    }
}

/// The tenants the configured `keys` name (empty: the API is open).
pub fn tenants(keys: &[String]) -> std::collections::BTreeSet<String> {
    keys.iter().map(|k| split_key(k).0).collect()
}

/// The tenant of API key `given` among the configured `keys`, if it is one of them. A
/// configured key is `KEY` (its own tenant, named after a hash of the key) or
/// `TENANT:KEY` (keys sharing a tenant share its prefix cache).
///
/// Every configured key is compared, each in constant time (`subtle`), so neither the time
/// of one comparison nor where the search stops tells an attacker how much of a key matched.
pub fn tenant_of(keys: &[String], given: &str) -> Option<Tenant> {
    let mut found = None;
    for entry in keys {
        let (tenant, key) = split_key(entry);
        if bool::from(key.as_bytes().ct_eq(given.as_bytes())) && found.is_none() {
            found = Some(Tenant(tenant));
        }
    }
    found
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
    async fn start(&self, req: Request<api::GenerateRequest>) -> Result<Chunks, Status> {
        // tonic's transport answers CANCELLED when the client's deadline passes; end the
        // request a little earlier so the client hears DEADLINE_EXCEEDED from us instead.
        let deadline = grpc_timeout(req.metadata()).map(|d| d.saturating_sub(d / 20 + Duration::from_millis(5)));
        let tenant = req.extensions().get::<Tenant>().cloned();
        start_request(&self.0, req.into_inner(), deadline, "grpc", tenant.as_ref()).await
    }
}

/// Checks `req`, admits it and starts it: every front door (gRPC, HTTP) goes through here.
pub async fn start_request(
    s: &Arc<RouterState>,
    req: api::GenerateRequest,
    deadline: Option<Duration>,
    api: &'static str,
    tenant: Option<&Tenant>,
) -> Result<Chunks, Status> {
    let accepted = Instant::now();
    // A bad request is the client's to fix whatever the load: check it first. The bounds
    // on its size come before any tokenizing, which runs off the runtime.
    let checked = async {
        check_input_size(req.input.as_ref(), &s.facts)?;
        let mut v = s.tokenize(move |s| validate(&req, &s.facts, public_request_id)).await??;
        // The client's salt was checked as sent; the workers get the router's keyed one.
        v.cache_salt = effective_salt(&s.salt_key, tenant, v.cache_salt.as_deref());
        Ok::<_, Status>((v, admit(s, tenant)?))
    }
    .await;
    let (v, permit) = match checked {
        Ok(x) => x,
        Err(e) => {
            metrics::request_done(api, metrics::error_kind(e.code()));
            return Err(e);
        }
    };
    metrics::tokens(v.prompt.len());
    let (tx, rx) = mpsc::channel(64);
    let tx = Outbox::new(tx, s.stream_stall);
    tokio::spawn(run_request(s.clone(), Arc::new(v), tx, accepted, deadline, permit, api));
    Ok(rx)
}

#[tonic::async_trait]
impl Generate for GenerateService {
    async fn generate(&self, req: Request<api::GenerateRequest>) -> Result<Response<api::GenerateResponse>, Status> {
        let mut rx = self.start(req).await?;
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
        Ok(Response::new(ReceiverStream::new(self.start(req).await?)))
    }

    async fn tokenize(&self, req: Request<api::TokenizeRequest>) -> Result<Response<api::TokenizeResponse>, Status> {
        let r = req.into_inner();
        check_model(&r.model, &self.0.facts)?;
        let input = r.input.map(|i| match i {
            api::tokenize_request::Input::Prompt(p) => api::generate_request::Input::Prompt(p),
            api::tokenize_request::Input::Messages(m) => api::generate_request::Input::Messages(m),
        });
        check_input_size(input.as_ref(), &self.0.facts)?;
        let add_generation_prompt = r.add_generation_prompt.unwrap_or(true);
        let (mut ids, rendered) =
            self.0.tokenize(move |s| input_ids(input.as_ref(), &s.facts, add_generation_prompt)).await??;
        let f = &self.0.facts;
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
    fn keys_name_their_tenants() {
        let keys = vec!["sk-plain".to_string(), "acme:sk-a1".to_string(), "acme:sk-a2".to_string()];
        let plain = tenant_of(&keys, "sk-plain").unwrap();
        assert!(plain.0.starts_with("key-"));
        assert_eq!(tenant_of(&keys, "sk-a1"), Some(Tenant("acme".into())));
        assert_eq!(tenant_of(&keys, "sk-a1"), tenant_of(&keys, "sk-a2"), "keys of one tenant share it");
        assert_eq!(tenant_of(&keys, "acme:sk-a1"), None, "the tenant is not part of the key");
        assert_eq!(tenant_of(&keys, "sk-nope"), None);
        // The salts that keep tenants apart: unit tables in `salt.rs`.
    }

    #[test]
    fn keys_list_their_tenants_once_each() {
        let keys: Vec<String> = ["sk-plain", "acme:sk-a1", "acme:sk-a2", "beta:sk-b"].map(String::from).into();
        let named = tenants(&keys);
        assert_eq!(named.len(), 3, "{named:?}");
        assert!(named.contains("acme") && named.contains("beta"));
        // A plain key's tenant is the one its requests are counted under.
        assert!(named.contains(&tenant_of(&keys, "sk-plain").unwrap().0));
        assert!(tenants(&[]).is_empty(), "an open API names no tenant");
    }

    #[test]
    fn public_ids_are_128_random_bits() {
        let ids: Vec<String> = (0..256).map(|_| public_request_id()).collect();
        for id in &ids {
            let hex = id.strip_prefix("req-").unwrap();
            assert!(hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Half the bits differ between consecutive ids, on average: nothing counts up.
        let low = |id: &String| u64::from_str_radix(&id[id.len() - 16..], 16).unwrap();
        let flips: u32 = ids.windows(2).map(|w| (low(&w[0]) ^ low(&w[1])).count_ones()).sum();
        let mean = flips as f64 / (ids.len() - 1) as f64;
        assert!((24.0..40.0).contains(&mean), "{mean} bits differ on average");
    }
}
