//! The OpenAI-compatible HTTP front door (axum), beside the gRPC API on the same
//! router: `/v1/chat/completions`, `/v1/completions` (streaming as server-sent
//! events, or whole), `/v1/models`, and `/health`, `/ready`, `/metrics`.
//!
//! A request is translated to `tandem.v1` (`openai.rs`) and started exactly as a
//! gRPC one; its chunks are translated back. The first chunk is awaited before
//! the response starts, so a request that cannot be served at all (no worker,
//! overload) gets its HTTP status instead of a 200 with an error event. A client
//! that disconnects drops the response stream, which cancels the request; one that
//! stops reading a stream has it cancelled after `--stream-stall-timeout` (`stall`).
//!
//! `limits` bounds what a client may send and how long it may take (headers, body,
//! the whole request) and serves the connections; `conns` caps how many are open, in
//! total and per client. `/metrics` may require an API key ([`MetricsAccess`]).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{json, Value};
use tandem_cluster::Role;
use tandem_proto::tandem::v1 as api;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::keys::{tenant_of, Tenant};
use crate::openai::{
    chat_logprobs, chat_request_with_tools, completion_request, prompt_echo, token_text, usage_json, ApiError,
    ChatRequest, CompletionLogprobs, CompletionRequest,
};
use crate::relay::{stall_message, stalled, start_request, Chunks};
use crate::stall::{HandOff, Outbox};
use crate::state::RouterState;

mod conns;
mod limits;

pub use conns::{client_of, ConnCounts, ConnGate, ConnPermit, Refusal};
use limits::{read_body, request_deadline, within};
pub use limits::{serve, HttpLimits, MAX_BODY, REQUEST_TIMEOUT_HEADER};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(self.body())).into_response();
        if self.status == 429 {
            let secs = self.retry_after.unwrap_or(1).max(1);
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self.status, 408 | 413) {
            // The rest of the body was not read: the connection cannot carry another request.
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// Who may read `/metrics` on the HTTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetricsAccess {
    /// Anyone who reaches the port (the default: existing scrapes keep working).
    #[default]
    Open,
    /// A client with one of the API keys, as `Authorization: Bearer <key>` (401 otherwise).
    ApiKey,
}

/// The HTTP routes over a router's state; `limits` bound each request's body and time,
/// `metrics` says who may read `/metrics` (`/health` and `/ready` stay open for probes).
pub fn routes(state: Arc<RouterState>, limits: HttpLimits, metrics_access: MetricsAccess) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(Extension(limits))
        .layer(Extension(metrics_access))
        .with_state(state)
}

/// `Authorization: Bearer <key>` against the configured keys (none configured: open);
/// the caller's tenant when keys are configured.
pub fn authorized(state: &RouterState, headers: &HeaderMap) -> Result<Option<Tenant>, ApiError> {
    if state.api_keys.is_empty() {
        return Ok(None);
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given.and_then(|k| tenant_of(&state.api_keys, k)) {
        Some(t) => Ok(Some(t)),
        None => Err(ApiError::unauthorized()),
    }
}

/// How deep serde_json lets JSON nest (its recursion limit): deeper bodies are refused
/// while parsing, long before the stack is at risk.
const MAX_JSON_DEPTH: usize = 128;

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let message = if e.to_string().starts_with("recursion limit exceeded") {
            format!("the body nests JSON deeper than {MAX_JSON_DEPTH} levels (line {} column {})", e.line(), e.column())
        } else {
            format!("the body is not a valid {what} request: {e}")
        };
        ApiError { status: 400, kind: "invalid_request_error", message, param: None, code: None, retry_after: None }
    })
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Waits for the first chunk, so that a request failing before any output gets its status.
async fn first(mut chunks: Chunks) -> Result<(api::GenerateStreamResponse, Chunks), ApiError> {
    match chunks.recv().await {
        Some(Ok(m)) => Ok((m, chunks)),
        Some(Err(s)) => Err(ApiError::from_status(&s)),
        None => Err(ApiError::from_status(&tonic::Status::internal("the request ended without output"))),
    }
}

/// An SSE response fed by `produce`, which gets a sender (waiting at most `stall` for the
/// client to take each event) and ends when the client leaves.
fn sse<F, Fut>(stall: Duration, produce: F) -> Response
where
    F: FnOnce(Outbox<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    // Detached on purpose: `produce` relays one request's chunks and ends with it or with
    // the client (a closed or stalled `tx`); the request's own run is counted in flight.
    tokio::spawn(produce(Outbox::new(tx, stall)));
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

fn data(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// The next chunk, or None when the client left (its sender is closed) or the stream ended.
async fn next_chunk(
    chunks: &mut Chunks,
    tx: &Outbox<Result<Event, Infallible>>,
) -> Option<Result<api::GenerateStreamResponse, tonic::Status>> {
    tokio::select! {
        m = chunks.recv() => m,
        _ = tx.closed() => None,
    }
}

/// Starts `req` with the request's deadline (inputs too large to tokenize are refused
/// first, as on gRPC).
async fn start(
    state: &Arc<RouterState>,
    req: api::GenerateRequest,
    deadline: Instant,
    tenant: Option<&Tenant>,
) -> Result<Chunks, ApiError> {
    let left = deadline.saturating_duration_since(Instant::now());
    start_request(state, req, Some(left), "http", tenant).await.map_err(|s| ApiError::from_status(&s))
}

/// The `x-slo-ttft-ms` header: the request's TTFT objective in ms (`tandem.v1`
/// `slo_ttft_ms`); absent: none.
fn slo_header(headers: &HeaderMap) -> Result<Option<u32>, ApiError> {
    let Some(v) = headers.get("x-slo-ttft-ms") else { return Ok(None) };
    let bad = || ApiError::bad("x-slo-ttft-ms", "must be a whole number of milliseconds, 1 to 600000");
    let ms: u32 = v.to_str().map_err(|_| bad())?.trim().parse().map_err(|_| bad())?;
    if !(1..=crate::validate::MAX_SLO_TTFT_MS).contains(&ms) {
        return Err(bad());
    }
    Ok(Some(ms))
}

async fn chat(
    State(state): State<Arc<RouterState>>,
    Extension(limits): Extension<HttpLimits>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let deadline = request_deadline(&headers, &limits)?;
    let tenant = authorized(&state, &headers)?;
    let body = read_body(body, &limits).await?;
    let r: ChatRequest = parse(&body, "chat completion")?;
    let (mut req, tools) = chat_request_with_tools(&r)?;
    req.slo_ttft_ms = slo_header(&headers)?;
    let want_logprobs = req.sampling.as_ref().is_some_and(|s| s.logprobs.is_some());
    let include_usage = r.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let field = if tools.guide.is_some() { Some("tool_choice") } else { crate::structured::guide_field(&r.common) };
    let chunks = start(&state, req, deadline, tenant.as_ref()).await.map_err(|e| e.naming_guide(field))?;
    let (head, mut chunks) = within(deadline, first(chunks)).await??;
    let id = format!("chatcmpl-{}", head.request_id);
    let (model, created) = (head.model.clone(), now_secs());

    if !r.common.stream {
        let mut choices: BTreeMap<u32, (String, Vec<Value>, Option<&'static str>)> = BTreeMap::new();
        let mut usage = None;
        let mut msg = Some(Ok(head));
        while let Some(m) = msg {
            let m = m.map_err(|s| ApiError::from_status(&s))?;
            let c = choices.entry(m.index).or_default();
            c.0.push_str(&m.text);
            c.1.extend(chat_logprobs(&m.logprobs));
            c.2 = m.finish_reason().as_openai_str().or(c.2);
            usage = m.usage.or(usage);
            msg = within(deadline, chunks.recv()).await?;
        }
        let choices: Vec<Value> = choices
            .into_iter()
            .map(|(i, (text, lps, finish))| {
                let mut message = json!({"role": "assistant", "content": text});
                let mut finish = finish;
                if tools.parse {
                    let (content, calls) = crate::tools::parse(&text, &tools.names);
                    if !calls.is_empty() {
                        message["content"] = json!(content);
                        message["tool_calls"] = calls.iter().enumerate().map(|(k, c)| c.json(k)).collect();
                        // As OpenAI: an answer that calls tools ends for that reason.
                        if finish == Some("stop") {
                            finish = Some("tool_calls");
                        }
                    }
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": if want_logprobs { json!({"content": lps}) } else { Value::Null },
                    "finish_reason": finish,
                })
            })
            .collect();
        let usage = usage.map(|u| usage_json(&u));
        return Ok(axum::Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage,
        }))
        .into_response());
    }

    let mut started = std::collections::HashSet::new();
    // Per choice: its call parser and how many calls it has sent.
    let mut parsers: BTreeMap<u32, (crate::tools::StreamParser, usize)> = BTreeMap::new();
    let meta = StreamMeta {
        id,
        object: "chat.completion.chunk",
        created,
        model,
        include_usage,
        score_only: false,
        deadline,
        stall: state.stream_stall,
    };
    Ok(stream_events(meta, head, chunks, move |m| {
        let mut finish = m.finish_reason().as_openai_str();
        let mut delta = json!({"content": m.text});
        if tools.parse {
            // Text outside call blocks streams as content; each call goes out whole in
            // `delta.tool_calls` as soon as its block closes.
            let (parser, sent) =
                parsers.entry(m.index).or_insert_with(|| (crate::tools::StreamParser::new(&tools.names), 0));
            let (mut content, mut calls) = parser.push(&m.text);
            if finish.is_some() {
                let (rest, more) = parser.finish();
                content.push_str(&rest);
                calls.extend(more);
            }
            delta = json!({"content": content});
            if !calls.is_empty() {
                delta["tool_calls"] = calls.iter().enumerate().map(|(k, c)| c.json(*sent + k)).collect();
                *sent += calls.len();
            }
            if finish == Some("stop") && *sent > 0 {
                finish = Some("tool_calls");
            }
        }
        if started.insert(m.index) {
            delta["role"] = json!("assistant");
        }
        json!({
            "index": m.index,
            "delta": delta,
            "logprobs": if want_logprobs { json!({"content": chat_logprobs(&m.logprobs)}) } else { Value::Null },
            "finish_reason": finish,
        })
    }))
}

/// What every chunk of one streamed response repeats.
struct StreamMeta {
    id: String,
    object: &'static str,
    created: i64,
    model: String,
    include_usage: bool,
    /// Prompt scoring only: the token generated to run the request is not reported.
    score_only: bool,
    /// When the stream is cut with a timeout error event.
    deadline: Instant,
    /// How long the client may take nothing before the stream is cut (`--stream-stall-timeout`).
    stall: Duration,
}

/// Streams a generation as server-sent events: one `data:` event per chunk, the choice
/// rendered by `choice`; an error event if the generation fails; with `include_usage` a
/// last event with no choices and the usage; then `data: [DONE]`. Stops (cancelling the
/// generation) as soon as the client leaves, the deadline passes (after a timeout error
/// event, if the client is reading) or the client takes no event for the stall timeout
/// (the error event is queued for it, should it read again).
fn stream_events(
    meta: StreamMeta,
    head: api::GenerateStreamResponse,
    mut chunks: Chunks,
    mut choice: impl FnMut(&api::GenerateStreamResponse) -> Value + Send + 'static,
) -> Response {
    let stall = meta.stall;
    sse(stall, move |tx| async move {
        let StreamMeta { id, object, created, model, include_usage, score_only, deadline, stall: _ } = meta;
        // Past the stall timeout the generation is cancelled (dropping `chunks` does it).
        let stalled_out = |tx: &Outbox<Result<Event, Infallible>>| {
            stalled("http", &id, stall);
            let e = ApiError::from_status(&tonic::Status::cancelled(stall_message(stall)));
            tx.last(data(&e.body()));
        };
        let mut usage = None;
        let mut msg = Some(Ok(head));
        while let Some(m) = msg {
            let m = match m {
                Ok(m) => m,
                Err(s) => {
                    // The generation is over (its slots are free): only the event is bounded.
                    if tx.send(data(&ApiError::from_status(&s).body())).await.is_err() {
                        return;
                    }
                    break;
                }
            };
            let mut chunk =
                json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice(&m)]});
            if include_usage {
                // OpenAI sends `usage: null` on every chunk but the last when usage is asked for.
                chunk["usage"] = Value::Null;
            }
            usage = m.usage.or(usage);
            // A client that stops reading is cut at the stall timeout, or the deadline.
            msg = match within(deadline, async {
                tx.send(data(&chunk)).await?;
                Ok(next_chunk(&mut chunks, &tx).await)
            })
            .await
            {
                Ok(Ok(next)) => next,
                Ok(Err(HandOff::Closed)) => return,
                Ok(Err(HandOff::Stalled)) => {
                    stalled_out(&tx);
                    return;
                }
                Err(e) => {
                    // Dropping `chunks` cancels the generation.
                    tx.last(data(&e.body()));
                    return;
                }
            };
            if tx.is_closed() {
                return;
            }
        }
        if include_usage {
            if let Some(mut u) = usage {
                if score_only {
                    u.completion_tokens = 0;
                    u.total_tokens = u.prompt_tokens;
                }
                let last = json!({
                    "id": id, "object": object, "created": created, "model": model,
                    "choices": [], "usage": usage_json(&u),
                });
                // The generation is over: a client that stops reading now holds no slot, only
                // its connection, and this task ends at the stall timeout.
                if tx.send(data(&last)).await.is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    })
}

/// Per-choice state of a completions response.
#[derive(Default)]
struct CompletionChoice {
    text: String,
    logprobs: CompletionLogprobs,
    finish: Option<&'static str>,
    started: bool,
}

async fn completions(
    State(state): State<Arc<RouterState>>,
    Extension(limits): Extension<HttpLimits>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let deadline = request_deadline(&headers, &limits)?;
    let tenant = authorized(&state, &headers)?;
    let body = read_body(body, &limits).await?;
    let r: CompletionRequest = parse(&body, "completion")?;
    let mut plan = completion_request(&r)?;
    plan.request.slo_ttft_ms = slo_header(&headers)?;
    let want_logprobs = plan.request.sampling.as_ref().is_some_and(|s| s.logprobs.is_some());
    let include_usage = r.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let field = crate::structured::guide_field(&r.common);
    let chunks =
        start(&state, plan.request.clone(), deadline, tenant.as_ref()).await.map_err(|e| e.naming_guide(field))?;
    // Echo needs the prompt as text and ids (the request passed validation, so this does too).
    let echo = if plan.echo {
        let req = plan.request;
        // The request started, so its model is one this router serves.
        let facts = state.models.resolve(&req.model).map_err(|s| ApiError::from_status(&s))?.clone();
        let f = facts.clone();
        let (text, ids) = state
            .tokenize(move || prompt_echo(&req, &f))
            .await
            .and_then(|r| r)
            .map_err(|s| ApiError::from_status(&s))?;
        let first_token = ids.first().map(|&t| token_text(&facts, t)).unwrap_or_default();
        Some((text, first_token))
    } else {
        None
    };
    let (head, mut chunks) = within(deadline, first(chunks)).await??;
    let id = format!("cmpl-{}", head.request_id);
    let (model, created) = (head.model.clone(), now_secs());
    let score_only = plan.score_only;

    // Folds one chunk into its choice; returns the chunk's text and logprobs share.
    let fold = move |c: &mut CompletionChoice, m: &api::GenerateStreamResponse| -> (String, usize) {
        let from = c.logprobs.tokens.len();
        let mut text = String::new();
        if !c.started {
            c.started = true;
            if let Some((prompt, first_token)) = &echo {
                text.push_str(prompt);
                if want_logprobs {
                    c.logprobs.push_unscored(first_token);
                    for t in &m.prompt_logprobs {
                        c.logprobs.push(t);
                    }
                }
            }
        }
        if !score_only {
            text.push_str(&m.text);
            if want_logprobs {
                for t in &m.logprobs {
                    c.logprobs.push(t);
                }
            }
        }
        c.text.push_str(&text);
        if let Some(f) = m.finish_reason().as_openai_str() {
            c.finish = Some(f);
        }
        (text, from)
    };

    if !r.common.stream {
        let mut choices: BTreeMap<u32, CompletionChoice> = BTreeMap::new();
        let mut usage = None;
        let mut msg = Some(Ok(head));
        while let Some(m) = msg {
            let m = m.map_err(|s| ApiError::from_status(&s))?;
            fold(choices.entry(m.index).or_default(), &m);
            usage = m.usage.or(usage);
            msg = within(deadline, chunks.recv()).await?;
        }
        let choices: Vec<Value> = choices
            .into_iter()
            .map(|(i, c)| {
                json!({
                    "index": i, "text": c.text,
                    "logprobs": if want_logprobs { c.logprobs.json() } else { Value::Null },
                    "finish_reason": c.finish,
                })
            })
            .collect();
        let usage = usage.map(|mut u| {
            if score_only {
                u.completion_tokens = 0;
                u.total_tokens = u.prompt_tokens;
            }
            usage_json(&u)
        });
        return Ok(axum::Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage,
        }))
        .into_response());
    }

    let mut choices: HashMap<u32, CompletionChoice> = HashMap::new();
    let meta = StreamMeta {
        id,
        object: "text_completion",
        created,
        model,
        include_usage,
        score_only,
        deadline,
        stall: state.stream_stall,
    };
    Ok(stream_events(meta, head, chunks, move |m| {
        let c = choices.entry(m.index).or_default();
        let (text, from) = fold(c, m);
        json!({
            "index": m.index, "text": text,
            "logprobs": if want_logprobs { c.logprobs.since(from) } else { Value::Null },
            "finish_reason": m.finish_reason().as_openai_str(),
        })
    }))
}

async fn models(State(state): State<Arc<RouterState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorized(&state, &headers)?;
    let data: Vec<Value> = crate::service::served_models(&state)
        .into_iter()
        .map(|(id, ctx)| {
            json!({"id": id, "object": "model", "created": state.created, "owned_by": "tandem", "max_model_len": ctx})
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// Ready when the router can serve a request: a prefill-capable and a decode-capable
/// worker answer (one worker of role `both` is both), and it is not draining.
pub fn is_ready(state: &RouterState) -> bool {
    let ws = state.routing.members.snapshot();
    let healthy = |f: fn(Role) -> bool| ws.iter().any(|w| w.healthy && f(w.desc.role));
    !state.admission.draining.load(Ordering::SeqCst) && healthy(Role::can_prefill) && healthy(Role::can_decode)
}

async fn ready(State(state): State<Arc<RouterState>>) -> Response {
    if is_ready(&state) {
        (StatusCode::OK, "ready").into_response()
    } else if state.admission.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: no healthy prefill-capable or decode-capable worker")
            .into_response()
    }
}

/// Sets the gauges that are read from state, not counted as things happen.
pub fn refresh_gauges(state: &RouterState) {
    let ws = state.routing.members.snapshot();
    crate::metrics::set_in_flight(state.admission.inflight.load(Ordering::SeqCst), state.admission.max_inflight);
    crate::metrics::set_tenant_max_in_flight(state.admission.quotas.limits().default);
    for role in Role::ALL {
        for (healthy, label) in [(true, "healthy"), (false, "unhealthy")] {
            let n = ws.iter().filter(|w| w.desc.role == role && w.healthy == healthy).count();
            crate::metrics::set_workers(role.as_str(), label, n);
        }
    }
}

async fn metrics(
    State(state): State<Arc<RouterState>>,
    Extension(access): Extension<MetricsAccess>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if access == MetricsAccess::ApiKey {
        // The router refuses to start with this and no key, so `authorized` never waves it through.
        authorized(&state, &headers)?;
    }
    refresh_gauges(&state);
    let body = match crate::telemetry::handle() {
        Some(h) => h.render(),
        None => String::from("# no metrics recorder is installed in this process\n"),
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deeply_nested_json_is_a_400_that_says_so() {
        for depth in [129, 10_000, 1_000_000] {
            // Nested in a field the request type knows, in one it does not, and objects from the top.
            let nest = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
            let bodies = [
                format!(r#"{{"prompt": {}}}"#, nest(depth)),
                format!(r#"{{"prompt": "x", "extra": {}}}"#, nest(depth)),
                format!("{}1{}", r#"{"a": "#.repeat(depth), "}".repeat(depth)),
            ];
            for body in bodies {
                let e = parse::<CompletionRequest>(&Bytes::from(body), "completion").err().expect("refused");
                assert_eq!(e.status, 400);
                assert!(e.message.contains("deeper than 128 levels"), "{depth}: {}", e.message);
            }
        }
        // 100 levels inside an ignored field are fine.
        let ok = format!(r#"{{"prompt": "x", "extra": {}{}}}"#, "[".repeat(100), "]".repeat(100));
        assert!(parse::<CompletionRequest>(&Bytes::from(ok), "completion").is_ok());
    }
}
