//! One request from the front door to its last chunk. [`start_request`] checks it,
//! admits it and starts it (every front door, gRPC and HTTP, goes through it); a
//! [`RequestRelay`] runs its `n` choices concurrently and relays their chunks,
//! interleaved, to the client's stream, adding what only the whole request knows: each
//! choice's timing, and the usage on the last chunk.
//!
//! A client that leaves cancels every choice on every worker; a deadline ends the request
//! with DEADLINE_EXCEEDED; a request with no first token within `--first-token-timeout` is
//! refused as overloaded; a client that reads nothing of its stream for
//! `--stream-stall-timeout` has its request cancelled (`stall`). Admission's permit is
//! held for the request's whole life.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::worker::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::Status;

use crate::admission::overloaded;
use crate::choice::{ChoiceRun, Chunk};
use crate::ids::public_request_id;
use crate::keys::Tenant;
use crate::metrics;
use crate::routing::Routing;
use crate::salt::effective_salt;
use crate::stall::{HandOff, Outbox};
use crate::state::RouterState;
use crate::validate::{check_input_size, validate, Validated};

/// A generation's chunks as they come; dropping the receiver cancels the request.
pub type Chunks = mpsc::Receiver<Result<api::GenerateStreamResponse, Status>>;

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
        // The model first: a name this router does not serve is NOT_FOUND whatever the input.
        let facts = s.models.resolve(&req.model)?.clone();
        check_input_size(req.input.as_ref(), &facts)?;
        let mut v = s.tokenize(move || validate(&req, &facts, public_request_id)).await??;
        // The client's salt was checked as sent; the workers get the router's keyed one.
        v.cache_salt = effective_salt(&s.salt_key, tenant, v.cache_salt.as_deref());
        v.tenant = tenant.map(|t| t.0.clone());
        if let Some(kind) = v.sampling.guide.as_ref().and_then(|g| g.kind.as_ref()) {
            metrics::constrained(crate::validate::guide_kind(kind));
        }
        if let Some(p) = s.routing.predictor.as_ref().filter(|_| v.predicted_output.is_none()) {
            let n = p.predict(&v.prompt, v.sampling.max_tokens);
            metrics::predicted_output(n);
            v.predicted_output = Some(n);
        }
        Ok::<_, Status>((v, s.admission.admit(tenant)?))
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
    let relay = RequestRelay {
        routing: s.routing.clone(),
        v: Arc::new(v),
        tx: Outbox::new(tx, s.stream_stall),
        accepted,
        deadline,
        first_token_timeout: s.first_token_timeout,
        api,
    };
    // Detached on purpose: the run ends with its request (finished, failed, past its
    // deadline or first-token bound) or its client (a closed `tx`), holding the admission
    // permit until then; a drain waits for it through that permit's in-flight count.
    let active = crate::fairness::Active::new(
        s.routing.ledger.clone(),
        &s.routing.members,
        crate::fairness::tenant_of(&relay.v),
    );
    tokio::spawn(async move {
        let (_permit, _active) = (permit, active);
        relay.run().await
    });
    Ok(rx)
}

/// One request's run: its choices, and the relay of their chunks to the client.
pub(crate) struct RequestRelay {
    pub(crate) routing: Arc<Routing>,
    pub(crate) v: Arc<Validated>,
    pub(crate) tx: Outbox<Result<api::GenerateStreamResponse, Status>>,
    pub(crate) accepted: Instant,
    /// The request's own deadline, from `accepted`.
    pub(crate) deadline: Option<Duration>,
    /// See `RouterState::first_token_timeout`.
    pub(crate) first_token_timeout: Duration,
    /// The front door, as metrics name it (`grpc`, `http`).
    pub(crate) api: &'static str,
}

impl RequestRelay {
    /// Runs every choice and streams their chunks to the client until all finish, one
    /// fails, the deadline passes, the client leaves or stops reading.
    pub(crate) async fn run(self) {
        let (ctx, mut crx) = mpsc::channel(64);
        // Dropping `choices` (any return below) cancels the choices on their workers.
        let mut choices = JoinSet::new();
        for i in 0..self.v.n {
            let run = ChoiceRun::new(self.routing.clone(), self.v.clone(), i, ctx.clone(), self.accepted);
            choices.spawn(run.run());
        }
        drop(ctx);
        let (api, tx) = (self.api, &self.tx);
        let mut tally = Tally::new(self.v.n, self.v.prompt.len() as u32, self.accepted);
        let end = self.deadline.map(|d| tokio::time::Instant::now() + d);
        let deadline_passed = || async move {
            match end {
                Some(e) => tokio::time::sleep_until(e).await,
                None => std::future::pending().await,
            }
        };
        let past_deadline = || {
            metrics::request_done(api, "deadline_exceeded");
            tx.last(Err(Status::deadline_exceeded("the request's deadline passed")));
        };
        // Served or refused: no request waits for its first token longer than this.
        let first_by = tokio::time::Instant::now() + self.first_token_timeout;
        let mut started = false;
        loop {
            let next = tokio::select! {
                c = crx.recv() => c,
                _ = tokio::time::sleep_until(first_by), if !started => return self.no_first_token(),
                _ = tx.closed() => {
                    // The client left.
                    metrics::request_done(api, "cancelled");
                    return;
                }
                _ = deadline_passed() => return past_deadline(),
            };
            let chunk = match next {
                None => return metrics::request_done(api, "internal"),
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
            let (resp, done) = tally.add(chunk, now);
            if let Some(t) = resp.timing.as_ref().filter(|t| t.total_time_ms > 0.0) {
                // A choice finished: what placement measures itself against.
                let tpot = (t.mean_inter_token_ms > 0.0).then(|| Duration::from_secs_f64(t.mean_inter_token_ms / 1e3));
                let ttft = Duration::from_secs_f64(t.time_to_first_token_ms.max(0.0) / 1e3);
                let tokens = if t.mean_inter_token_ms > 0.0 {
                    (t.decode_time_ms / t.mean_inter_token_ms).round() as u32 + 1
                } else {
                    1
                };
                self.routing.placement.observe_finished(ttft, tpot, tokens);
            }
            // A client that reads nothing is cut at the stall timeout, or at its deadline.
            let sent = tokio::select! {
                sent = tx.send(Ok(resp)) => sent,
                _ = deadline_passed() => return past_deadline(),
            };
            match sent {
                Ok(()) => {}
                Err(HandOff::Closed) => return metrics::request_done(api, "cancelled"),
                Err(HandOff::Stalled) => {
                    stalled(api, &self.v.request_id, tx.stall());
                    metrics::request_done(api, "cancelled");
                    tx.last(Err(Status::cancelled(stall_message(tx.stall()))));
                    return;
                }
            }
            if done {
                metrics::seconds(metrics::E2E, now - self.accepted);
                metrics::request_done(api, "none");
                return;
            }
        }
    }

    /// Refuses a request that had no first token within the first-token timeout.
    fn no_first_token(&self) {
        let wait = self.first_token_timeout;
        metrics::request_done(self.api, "first_token_timeout");
        tracing::warn!(
            request = ?self.v.request_id,
            waited = ?wait,
            "no first token in time; refusing the request as overloaded"
        );
        self.tx.last(Err(overloaded(format!(
            "no first token within {} s (--first-token-timeout): the cluster is overloaded; retry later",
            wait.as_secs_f64()
        ))));
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

/// What a request counts across its choices' chunks: each choice's clock, the choices
/// still running, the prompt tokens served from cache.
struct Tally {
    clocks: Vec<ChoiceClock>,
    remaining: u32,
    prompt_tokens: u32,
    cached_tokens: u32,
    accepted: Instant,
}

impl Tally {
    fn new(n: u32, prompt_tokens: u32, accepted: Instant) -> Self {
        Tally {
            clocks: vec![ChoiceClock::default(); n as usize],
            remaining: n,
            prompt_tokens,
            cached_tokens: 0,
            accepted,
        }
    }

    /// Counts `chunk`, out at `now`: the client's response with its timing (on a choice's
    /// first and last chunks) and usage (on the request's last), and whether it was the last.
    fn add(&mut self, chunk: Chunk, now: Instant) -> (api::GenerateStreamResponse, bool) {
        let Chunk { mut out, prefill, cached_tokens } = chunk;
        let accepted = self.accepted;
        let clock = &mut self.clocks[out.index as usize];
        let first = clock.first.is_none();
        let tokens = out.token_ids.len();
        match clock.last {
            None if tokens > 0 => metrics::seconds(metrics::TTFT, now - accepted),
            Some(last) if tokens > 0 => {
                let per = (now - last) / tokens as u32;
                for _ in 0..tokens {
                    metrics::seconds(metrics::ITL, per);
                }
            }
            _ => {}
        }
        if tokens > 0 {
            clock.last = Some(now);
        }
        metrics::generated(tokens);
        clock.first.get_or_insert(now);
        clock.tokens += tokens as u32;
        if prefill.is_some() {
            clock.prefill = prefill;
        }
        if out.index == 0 && cached_tokens > 0 {
            // What the prefill side did not compute: never more than the prompt, whatever
            // a worker reports.
            self.cached_tokens = cached_tokens.min(self.prompt_tokens);
        }
        let finished = out.finish_reason() != api::FinishReason::Unspecified;
        out.timing = if finished {
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
            self.remaining -= 1;
        }
        let done = finished && self.remaining == 0;
        out.usage = done.then(|| {
            let completion: u32 = self.clocks.iter().map(|c| c.tokens).sum();
            api::Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: completion,
                total_tokens: self.prompt_tokens + completion,
                cached_tokens: self.cached_tokens,
            }
        });
        (out, done)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
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
