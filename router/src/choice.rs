//! One choice of a request, across workers: pick a pair (or a role-`both` worker), reserve
//! the prompt's blocks on the decode worker, open its stream, have the prefill worker
//! compute and ship the KV, and relay the tokens. When an attempt fails, `recovery` says
//! what comes next (migrate, recover the KV per policy, pass over a full decode worker, or
//! give up) and the choice tries again from the prompt plus what it already sent.
//!
//! What every choice shares is `routing::Routing`: the workers, the policy, the recovery
//! limits and the wait for KV room. A [`ChoiceRun`] is one choice; its methods are its
//! attempts and the relay of its decode stream, which turns each worker chunk into what the client
//! gets ([`Chunk`]) in one conversion. Workers are reached through `worker::WorkerApi`;
//! `choice_tests` runs choices over fake ones.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::WorkerId;
use tandem_proto::ids::{ClusterRequestId, LeaseId};
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::worker::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Status;

use crate::admission::overloaded;
use crate::ids::worker_request_id;
use crate::live;
use crate::members::{Picked, Route, RouteAsk};
use crate::metrics;
use crate::recovery::{
    self, failed, kv_fault, left, AttemptError, Budget, Fault, KvFailurePolicy, Next, Plan, Recovery,
};
use crate::routing::{Routing, WaitingForRoom};
use crate::slo;
use crate::validate::Validated;
use crate::worker::{CancelOnDrop, DecodeStream};

/// How long a route waits for a paused worker (fenced while it registers again, changing
/// role) before the request fails for want of one: a few of the workers' lease TTLs.
pub(crate) const PAUSED_WAIT: Duration = Duration::from_secs(5);

/// One chunk of one choice, on its way to the client.
pub(crate) struct Chunk {
    /// What the client gets, but for the usage and timing that the request adds.
    pub(crate) out: api::GenerateStreamResponse,
    /// The prefill worker's timing, on the first chunk of a choice it prefilled.
    pub(crate) prefill: Option<pb::PrefillTiming>,
    /// Prompt tokens served from a prefix cache (first chunk only).
    pub(crate) cached_tokens: u32,
}

/// Where a choice's chunks (or its error) go.
pub(crate) type ChunkSender = mpsc::Sender<Result<Chunk, Status>>;

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

/// Where a choice stands between its attempts: the plan of the next, the workers it
/// avoids, the budgets it spent, and its wait for KV room.
struct Tries {
    policy: KvFailurePolicy,
    plan: Plan,
    excluded: Vec<WorkerId>,
    /// Decode workers found full since the last wait for room; tried again after it.
    full: Vec<WorkerId>,
    migrations: usize,
    kv_recoveries: usize,
    overflows: usize,
    /// Since when the choice has been waiting for KV room (every decode worker full).
    wait_since: Option<Instant>,
    /// How many times it has looked for room since.
    rounds: u32,
}

impl Tries {
    fn new(policy: KvFailurePolicy) -> Self {
        Tries {
            policy,
            plan: Plan::Route,
            excluded: Vec::new(),
            full: Vec::new(),
            migrations: 0,
            kv_recoveries: 0,
            overflows: 0,
            wait_since: None,
            rounds: 0,
        }
    }

    /// The budgets left after `fault`, and what the cluster offers now.
    fn budget(&self, r: &Routing, model: &str, fault: &Fault, avoid: &[WorkerId]) -> Budget {
        Budget {
            migrations_left: r.migration_limit.saturating_sub(self.migrations),
            kv_recoveries_left: recovery::MAX_KV_RECOVERIES.saturating_sub(self.kv_recoveries),
            overflows_left: recovery::MAX_OVERFLOWS.saturating_sub(self.overflows),
            other_prefill: match fault {
                Fault::Kv { prefill, .. } => r.members.has_other_prefill(model, prefill, &self.excluded),
                _ => false,
            },
            other_decode: match fault {
                Fault::Full(decode) => r.members.has_other_decode(model, decode, avoid),
                _ => false,
            },
            // A worker that answered "full" judged the prompt able to fit its whole pool (it
            // refuses one that cannot as INVALID_ARGUMENT), so waiting can help.
            may_wait: !r.kv_wait.is_zero() && self.wait_since.is_none_or(|t| t.elapsed() < r.kv_wait),
        }
    }

    /// The status a choice ends with when it gives up after `err`.
    fn give_up(&self, err: AttemptError) -> Status {
        let policy = self.policy;
        match err.fault {
            Fault::Kv { .. } => Status::unavailable(format!(
                "{} (KV failure policy {policy}{})",
                err.status.message(),
                if policy == KvFailurePolicy::Fail { "" } else { "; no recovery left" }
            )),
            Fault::Full(_) => overloaded(match self.wait_since {
                Some(since) => {
                    metrics::seconds(metrics::ROOM_WAIT, since.elapsed());
                    format!(
                        "{} (no decode worker had room within {:.1} s)",
                        err.status.message(),
                        since.elapsed().as_secs_f64()
                    )
                }
                None => err.status.message().to_string(),
            }),
            _ => err.status,
        }
    }
}

/// What one attempt asks its workers for.
struct Ask {
    /// The attempt's id on its workers.
    rid: ClusterRequestId,
    sampling: pb::SamplingParams,
    /// The prompt, then what earlier attempts generated.
    prompt: Vec<u32>,
    resumed: u32,
}

/// A live migration's pre-copy, run beside the relay.
type Precopy = std::pin::Pin<Box<dyn std::future::Future<Output = Result<live::Ready, live::GiveUp>> + Send>>;

/// What a relay waits for next.
enum Awaited {
    Message(Result<Option<pb::DecodeResponse>, Status>),
    Precopied(Result<live::Ready, live::GiveUp>),
}

/// The worker a choice decodes on now (the attempt's, or where a live migration moved it),
/// as a migration step talks to it.
fn source(
    moved: &Option<(Picked, ClusterRequestId, CancelOnDrop)>,
    worker: &Picked,
    rid: ClusterRequestId,
) -> live::Source {
    match moved {
        Some((p, r, _)) => live::Source { id: p.id.clone(), worker: p.worker.clone(), rid: *r, lease: p.lease },
        None => live::Source { id: worker.id.clone(), worker: worker.worker.clone(), rid, lease: worker.lease },
    }
}

/// One choice of a request, from its first attempt to its last chunk or its error.
pub(crate) struct ChoiceRun {
    routing: Arc<Routing>,
    v: Arc<Validated>,
    index: u32,
    out: ChunkSender,
    accepted: Instant,
    /// Tokens sent to the client so far, across attempts: a later attempt resumes after them.
    generated: Vec<u32>,
    /// No attempt has been routed yet: the next is checked against the TTFT objective.
    first_attempt: bool,
    /// The first token's predicted time, and the residual it included (`slo::TtftModel`).
    predicted_ttft: Option<(Duration, f64)>,
    /// Its place in arrival order in the router's queue, once it has waited there.
    queue_seq: Option<u64>,
}

impl ChoiceRun {
    pub(crate) fn new(
        routing: Arc<Routing>,
        v: Arc<Validated>,
        index: u32,
        out: ChunkSender,
        accepted: Instant,
    ) -> Self {
        ChoiceRun {
            routing,
            v,
            index,
            out,
            accepted,
            generated: Vec::new(),
            first_attempt: true,
            predicted_ttft: None,
            queue_seq: None,
        }
    }

    /// The choice's first token is out: how its TTFT prediction fared, and its tenant's
    /// queue time and prompt tokens computed.
    fn first_token_seen(&self, marks: &Marks, prefill: Option<&pb::PrefillResponse>, local_cached: u32) {
        if let Some((predicted, residual)) = self.predicted_ttft {
            self.routing.ttft.observe(predicted, residual, self.accepted.elapsed());
        }
        let queued = prefill.and_then(|p| p.timing).map_or(0.0, |t| t.queue_time_ms / 1e3);
        let tenant = self.v.tenant.as_deref();
        metrics::tenant_queue(tenant, (marks.sent - marks.accepted).as_secs_f64() + queued);
        let cached = prefill.map_or(local_cached, |p| p.cached_tokens) as usize;
        metrics::tenant_tokens(tenant, "prefill", self.v.prompt.len().saturating_sub(cached));
    }

    /// What a call to worker `on` carries for its `fair` and `sjf` scheduling.
    fn scheduling(&self, on: &WorkerId) -> pb::Scheduling {
        crate::fairness::scheduling(&self.routing.ledger, &self.routing.members, &self.v, on)
    }

    /// Predicts the first token's time on `route` and, when the request is held to a TTFT
    /// objective it would miss, refuses it (RESOURCE_EXHAUSTED, `retry-after`).
    fn admit_by_slo(&mut self, route: &Route) -> Result<(), AttemptError> {
        let r = &self.routing;
        let computes = match route {
            Route::Disaggregated { prefill, .. } => prefill,
            Route::Local(w) => w,
        };
        let residual = r.ttft.residual();
        let predicted = slo::predict(&slo::Inputs {
            ahead_tokens: computes.queue_ahead,
            uncached: computes.uncached(),
            prefill_rate: r.placement.prefill_rate(),
            residual,
        });
        self.predicted_ttft = predicted.map(|p| (p, residual));
        let objective = r.slo_admission.objective(self.v.slo_ttft, r.placement.config.slo.ttft);
        match slo::decide(predicted, objective) {
            slo::Verdict::Admit => Ok(()),
            slo::Verdict::Refuse { retry_after } => {
                metrics::admission_refused("slo_ttft");
                let (p, o) = (predicted.unwrap_or_default(), objective.unwrap_or_default());
                let mut st = Status::resource_exhausted(format!(
                    "the first token is predicted in {} ms, after the request's TTFT objective of {} ms; retry later",
                    p.as_millis(),
                    o.as_millis()
                ));
                let secs = retry_after.as_secs().max(1).to_string();
                st.metadata_mut().insert("retry-after", secs.parse().expect("digits"));
                Err(AttemptError { status: st, fault: Fault::Request })
            }
        }
    }

    /// Runs the choice to its end; its chunks, or its error, go to `out`.
    pub(crate) async fn run(mut self) {
        if let Err(e) = self.choose().await {
            let _ = self.out.send(Err(e)).await;
        }
    }

    /// Attempts until one finishes, or recovery gives up.
    async fn choose(&mut self) -> Result<(), Status> {
        let r = self.routing.clone();
        let mut tries = Tries::new(self.v.kv_failure_policy.unwrap_or(r.kv_failure_policy));
        loop {
            let avoid: Vec<WorkerId> = tries.excluded.iter().chain(&tries.full).cloned().collect();
            let started = Instant::now();
            let result = self.attempt(&avoid, &tries.plan).await;
            if !matches!(&result, Err(AttemptError { fault: Fault::Full(_), .. })) {
                // Whatever this attempt held is being freed: the longest-waiting choice (tokio's
                // `Notify` wakes in the order waiters registered) tries again. One per ending
                // attempt, not all: a herd of retries would each cost a `Reserve`.
                r.room.wake_first();
                if let Some(since) = tries.wait_since.take() {
                    // The wait ended when this attempt found room.
                    metrics::seconds(metrics::ROOM_WAIT, started - since);
                    tries.rounds = 0;
                }
            }
            let err = match result {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let policy = tries.policy;
            let decision = recovery::next(&err.fault, policy, tries.budget(&r, &self.v.model, &err.fault, &avoid));
            if let Fault::Kv { .. } = err.fault {
                let action = match &decision {
                    Next::Again { kind: Recovery::Kv(p), .. } => p.as_str(),
                    _ if policy == KvFailurePolicy::Fail => "fail",
                    _ => "gave_up",
                };
                metrics::kv_failure(policy.as_str(), action);
            }
            match decision {
                Next::GiveUp => return Err(tries.give_up(err)),
                Next::WaitForRoom => self.wait_for_room(&mut tries, &err).await,
                Next::Again { plan, exclude, kind } => {
                    self.log_recovery(&mut tries, &err, kind, &plan);
                    match kind {
                        Recovery::Overflow => tries.full.extend(exclude),
                        _ => tries.excluded.extend(exclude),
                    }
                    tries.plan = plan;
                }
            }
        }
    }

    /// Waits for KV room (every decode worker was full): until an attempt ends somewhere,
    /// or a poll's time passes; then every decode worker is tried again.
    async fn wait_for_room(&mut self, tries: &mut Tries, err: &AttemptError) {
        let r = &self.routing;
        let since = *tries.wait_since.get_or_insert_with(|| {
            tracing::info!(
                request = ?self.v.request_id,
                choice = self.index,
                reason = err.status.message(),
                limit = ?r.kv_wait,
                "every decode worker is full; waiting for KV room"
            );
            metrics::waited_for_room();
            Instant::now()
        });
        tries.rounds += 1;
        // Waits in the router's policy order (`fairness::RoomQueue`): woken when an attempt
        // ends and this choice is first; polled in case blocks are freed some other way (a
        // reservation's lease ending, another router's request), trying again only when
        // first, or when the wait's limit is near.
        let seq = *self.queue_seq.get_or_insert_with(|| r.room.next_seq());
        let key = crate::fairness::queue_key(&r.queue_policy, &r.ledger, &r.members, &self.v, seq);
        let place = r.room.join(key);
        let _waiting = WaitingForRoom::new(r);
        loop {
            let poll = Duration::from_millis(20 << tries.rounds.min(5)).min(r.kv_wait.saturating_sub(since.elapsed()));
            tokio::select! {
                _ = place.notified() => break,
                _ = tokio::time::sleep(poll) => {}
            }
            if place.is_first() || since.elapsed() >= r.kv_wait {
                break;
            }
            tries.rounds += 1;
        }
        tries.full.clear();
        tries.overflows = 0;
        tries.plan = Plan::Route;
    }

    /// Spends the budget of a recovery of `kind` and says so in the log.
    fn log_recovery(&self, tries: &mut Tries, err: &AttemptError, kind: Recovery, plan: &Plan) {
        let (request, choice, error, tokens) =
            (&self.v.request_id, self.index, err.status.message(), self.generated.len());
        let policy = tries.policy;
        match (kind, plan) {
            (Recovery::Migration, _) => {
                tries.migrations += 1;
                metrics::migration();
                let (migration, limit) = (tries.migrations, self.routing.migration_limit);
                tracing::warn!(
                    request = ?request, choice, error, tokens, migration, limit,
                    "migrating to another worker"
                );
            }
            (Recovery::Kv(_), Plan::Recompute { on }) => {
                tries.kv_recoveries += 1;
                tracing::warn!(
                    request = ?request, choice, error, tokens, %policy, on = %on,
                    "KV transfer failed; recomputing on the decode worker"
                );
            }
            (Recovery::Overflow, _) => {
                tries.overflows += 1;
                tracing::info!(
                    request = ?request, choice, reason = error, tokens,
                    "decode worker full; trying another decode worker"
                );
            }
            (Recovery::Kv(_), Plan::Route) => {
                tries.kv_recoveries += 1;
                tracing::warn!(
                    request = ?request, choice, error, tokens, %policy,
                    "KV transfer failed; retrying on another prefill worker"
                );
            }
        }
    }

    /// What the next attempt asks for: a fresh id, the choice's sampling (its seed offset
    /// by its index), and the prompt plus what earlier attempts generated.
    fn ask(&self) -> Ask {
        let resumed = self.generated.len() as u32;
        let mut sampling = self.v.sampling.clone();
        sampling.seed = sampling.seed.map(|x| x.wrapping_add(self.index as u64));
        sampling.max_tokens = sampling.max_tokens.saturating_sub(resumed).max(1);
        if resumed > 0 {
            // Scored on the first try.
            sampling.prompt_logprobs = None;
        }
        let prompt = self.v.prompt.iter().chain(self.generated.iter()).copied().collect();
        Ask { rid: worker_request_id(), sampling, prompt, resumed }
    }

    /// One try at the choice: on fresh workers avoiding `avoid` (or as `plan` says).
    async fn attempt(&mut self, avoid: &[WorkerId], plan: &Plan) -> Result<(), AttemptError> {
        let ask = self.ask();
        let r = self.routing.clone();
        match plan {
            Plan::Route => {
                let to = RouteAsk {
                    model: &self.v.model,
                    prompt: &ask.prompt,
                    salt: self.v.cache_salt.as_deref(),
                    priority: self.v.priority,
                };
                let route = self.route_or_wait(&to, avoid).await?;
                if self.first_attempt {
                    self.first_attempt = false;
                    self.admit_by_slo(&route)?;
                }
                match route {
                    Route::Local(w) => self.local(w, ask, false).await,
                    Route::Disaggregated { prefill, decode } => self.disaggregated(prefill, decode, ask).await,
                }
            }
            Plan::Recompute { on } => match r.members.decoder(on) {
                Some(w) => self.local(w, ask, true).await,
                None => Err(left("decode", on)),
            },
        }
    }

    /// A route for `to`; when no worker can take it only because some are paused (fenced
    /// while they register again, changing role), the route is tried again each load poll
    /// for up to [`PAUSED_WAIT`] (within the request's deadline) instead of failing at once.
    async fn route_or_wait(&self, to: &RouteAsk<'_>, avoid: &[WorkerId]) -> Result<Route, Status> {
        let r = &self.routing;
        let until = tokio::time::Instant::now() + PAUSED_WAIT;
        loop {
            match r.members.route(r.policy.as_ref(), &r.placement, to, avoid) {
                Err(e)
                    if e.code() == tonic::Code::Unavailable
                        && tokio::time::Instant::now() < until
                        && r.members.has_paused(to.model, avoid) =>
                {
                    tokio::time::sleep(crate::members::LOAD_INTERVAL).await;
                }
                other => return other,
            }
        }
    }

    /// The whole attempt on one decode-capable worker: it prefills the prompt itself (a
    /// role-`both` worker, or `recompute` after a failed KV transfer).
    async fn local(&mut self, w: Picked, ask: Ask, recompute: bool) -> Result<(), AttemptError> {
        let rid = ask.rid;
        let mut guard = CancelOnDrop { rid, workers: vec![w.worker.clone()], done: false };
        let req = pb::DecodeRequest {
            request_id: ask.rid.0,
            sampling: Some(ask.sampling),
            resumed_tokens: ask.resumed,
            prompt_token_ids: ask.prompt,
            cache_salt: self.v.cache_salt.clone(),
            priority: self.v.priority,
            recompute,
            scheduling: Some(self.scheduling(&w.id)),
        };
        let marks = Marks { accepted: self.accepted, sent: Instant::now(), prefilled: None };
        let stream = tokio::select! {
            r = w.worker.decode(req) => r.map_err(|e| failed("decode", &w.id, e))?,
            _ = w.gone.cancelled() => return Err(left("decode", &w.id)),
        };
        guard.done = self.relay(stream, &w, rid, None, marks).await?;
        Ok(())
    }

    /// The attempt on a pair: reserve on `decode`, open its stream, prefill on `prefill`
    /// (which ships the KV to the reservation), then relay.
    async fn disaggregated(&mut self, prefill: Picked, decode: Picked, ask: Ask) -> Result<(), AttemptError> {
        let Ask { rid, sampling, prompt, resumed } = ask;
        let prompt_len = prompt.len();
        let v = &self.v;
        let reserve = pb::ReserveRequest {
            request_id: rid.0,
            prompt_token_ids: prompt.clone(),
            cache_salt: v.cache_salt.clone(),
            lease_ms: self.routing.kv_lease.as_millis() as u32,
            max_tokens: sampling.max_tokens,
            priority: v.priority,
            sampling: Some(sampling.clone()),
            resumed_tokens: resumed,
            sender_lease: LeaseId::to_wire(prefill.lease),
            cache_only: false,
            first_token_delivered: false,
            scheduling: Some(self.scheduling(&decode.id)),
        };
        // Armed before the reservation: a choice dropped while `Reserve` is in flight still
        // cancels it (a reservation that lands after the `Cancel` is abandoned by the
        // worker when no `Decode` attaches to it).
        let mut guard = CancelOnDrop { rid, workers: vec![decode.worker.clone(), prefill.worker.clone()], done: false };
        let res = tokio::select! {
            r = decode.worker.reserve(reserve) => r.map_err(|e| {
                let mut err = failed("decode", &decode.id, e);
                if err.status.code() == tonic::Code::ResourceExhausted {
                    // This worker's pool is full; another decode worker may have room.
                    err.fault = Fault::Full(decode.id.clone());
                }
                err
            })?,
            _ = decode.gone.cancelled() => return Err(left("decode", &decode.id)),
        };
        if let Some(layout) = &res.layout {
            let held = res.cached_blocks as usize * layout.block_size as usize;
            metrics::decode_cached(held);
            metrics::cache_outcome("decode", decode.predicted_cached, held);
        }
        let dreq = pb::DecodeRequest {
            request_id: rid.0,
            sampling: Some(sampling.clone()),
            resumed_tokens: resumed,
            ..Default::default()
        };
        let stream = tokio::select! {
            r = decode.worker.decode(dreq) => r.map_err(|e| failed("decode", &decode.id, e))?,
            _ = decode.gone.cancelled() => return Err(left("decode", &decode.id)),
        };
        let preq = pb::PrefillRequest {
            request_id: rid.0,
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
            scheduling: Some(self.scheduling(&prefill.id)),
        };
        let sent = Instant::now();
        let kv_failed = |status: Status, prefill_failed: bool| AttemptError {
            status,
            fault: Fault::Kv { prefill: prefill.id.clone(), decode: decode.id.clone(), prefill_failed },
        };
        let pres = tokio::select! {
            r = prefill.worker.prefill(preq) => match r {
                Ok(r) => r,
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
        let marks = Marks { accepted: self.accepted, sent, prefilled: Some(Instant::now()) };
        metrics::cache_outcome("prefill", prefill.predicted_cached, pres.cached_tokens as usize);
        if let Some(t) = pres.timing {
            let computed = prompt_len.saturating_sub(pres.cached_tokens as usize);
            self.routing.placement.observe_prefill(computed, Duration::from_secs_f64(t.compute_time_ms.max(0.0) / 1e3));
        }
        // The prefill worker's part is done: it no longer counts as in flight there.
        let prefill_id = prefill.id.clone();
        drop(prefill);
        guard.done = self.relay(stream, &decode, rid, Some((pres, &prefill_id)), marks).await?;
        Ok(())
    }

    /// Forwards `worker`'s decode stream (request `rid` there) as this choice's chunks,
    /// appending its tokens to `generated`. `prefilled`: the prefill worker's answer and who
    /// gave it (disaggregated only). A worker that asks for the request to move (a drain, a
    /// role change, an operator) has it moved live (`live`), and the relay goes on from
    /// its new worker. Returns true once the choice finished, false if the client left
    /// first.
    async fn relay(
        &mut self,
        mut stream: DecodeStream,
        worker: &Picked,
        rid: ClusterRequestId,
        prefilled: Option<(pb::PrefillResponse, &WorkerId)>,
        marks: Marks,
    ) -> Result<bool, AttemptError> {
        let (mut prefill, prefilled_by) = prefilled.map_or((None, None), |(p, by)| (Some(p), Some(by)));
        let resumed = !self.generated.is_empty();
        let mut first = true;
        // Where a live migration moved the choice (its worker, its id there, its guard).
        let mut moved: Option<(Picked, ClusterRequestId, CancelOnDrop)> = None;
        let mut live: Option<live::InFlight> = None;
        let mut precopy: Option<Precopy> = None;
        // After a move: when it was asked and when the request froze, until its first token.
        let mut downtime: Option<(Instant, Instant)> = None;
        loop {
            let (decode, gone) = match &moved {
                Some((p, ..)) => (p.id.clone(), p.gone.clone()),
                None => (worker.id.clone(), worker.gone.clone()),
            };
            let next = tokio::select! {
                m = stream.next() => Awaited::Message(m.transpose()),
                r = async { precopy.as_mut().expect("guarded").await }, if precopy.is_some() => Awaited::Precopied(r),
                _ = self.out.closed() => return Ok(false),
                _ = gone.cancelled() => return Err(left("decode", &decode)),
            };
            let msg = match next {
                Awaited::Message(m) => m,
                Awaited::Precopied(r) => {
                    precopy = None;
                    let from = source(&moved, worker, rid);
                    let frozen = match r {
                        Ok(ready) => live::freeze(&from).await.map(|_| ready),
                        Err(why) => Err(why),
                    };
                    match frozen {
                        // Its stream says FROZEN after its last token; the move goes on there.
                        Ok(ready) => live.as_mut().expect("asked").frozen = Some((ready, Instant::now())),
                        Err(why) => self.give_up(live.take().expect("asked"), why, &from, false).await?,
                    }
                    continue;
                }
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
                    let status = recovery::worker_error("decode", &decode, e);
                    return Err(AttemptError {
                        status,
                        fault: Fault::Kv { prefill, decode: decode.clone(), prefill_failed: false },
                    });
                }
                Err(e) => return Err(failed("decode", &decode, e)),
            };
            match d.migration() {
                pb::MigrationSignal::Unspecified => {}
                pb::MigrationSignal::Wanted | pb::MigrationSignal::Required => {
                    if live.is_none() && !self.generated.is_empty() {
                        let required = d.migration() == pb::MigrationSignal::Required;
                        let asked = live::InFlight { asked: Instant::now(), required, frozen: None };
                        if !self.routing.live_migration {
                            let from = source(&moved, worker, rid);
                            self.give_up(asked, live::GiveUp::Disabled, &from, false).await?;
                            continue;
                        }
                        live = Some(asked);
                        let to = (!d.migrate_to.is_empty()).then(|| d.migrate_to.clone());
                        let tokens = self.tokens();
                        let from = Arc::new(source(&moved, worker, rid));
                        let r = self.routing.clone();
                        precopy = Some(Box::pin(live::precopy(r, self.live_request(), from, to, tokens)));
                    }
                    continue;
                }
                pb::MigrationSignal::Frozen => {
                    let Some(mut l) = live.take() else { continue };
                    let Some((ready, frozen_at)) = l.frozen.take() else { continue };
                    let from = source(&moved, worker, rid);
                    let (tokens, n) = (self.tokens(), self.generated.len());
                    let precopied = ready.bytes;
                    match live::finalize(&self.routing, &self.live_request(), &from, ready, &tokens, n).await {
                        Ok(m) => {
                            metrics::live_migration_bytes(precopied + m.bytes);
                            tracing::info!(
                                request = ?self.v.request_id, choice = self.index, from = %from.id, to = %m.picked.id,
                                tokens = tokens.len(), bytes = precopied + m.bytes, "moved live"
                            );
                            stream = m.stream;
                            if let Some((_, _, g)) = &mut moved {
                                // Its request ended there with the commit.
                                g.done = true;
                            }
                            moved = Some((m.picked, m.rid, m.guard));
                            downtime = Some((l.asked, frozen_at));
                        }
                        Err((why, _)) => self.give_up(l, why, &from, true).await?,
                    }
                    continue;
                }
                pb::MigrationSignal::Moved => continue,
            }
            if let Some((asked, frozen)) = downtime.filter(|_| !d.token_ids.is_empty()) {
                downtime = None;
                metrics::seconds(metrics::LIVE_DOWNTIME, frozen.elapsed());
                metrics::seconds(metrics::LIVE_DURATION, asked.elapsed());
                metrics::live_migration("moved", "none");
            }
            if first && prefilled_by.is_none() {
                // A worker that prefilled the prompt itself says on its first message what
                // it reused.
                metrics::cache_outcome("local", worker.predicted_cached, d.cached_tokens as usize);
                worker.prefill_done();
            }
            if first && !resumed && !d.token_ids.is_empty() {
                marks.first_token(prefill.as_ref());
                self.first_token_seen(&marks, prefill.as_ref(), d.cached_tokens);
            }
            metrics::tenant_tokens(self.v.tenant.as_deref(), "decode", d.token_ids.len());
            let finished = d.finish_reason() != api::FinishReason::Unspecified;
            let chunk = self.chunk(d, if first { prefill.take() } else { None }, first && !resumed);
            first = false;
            if self.out.send(Ok(chunk)).await.is_err() {
                return Ok(false);
            }
            if finished {
                if live.is_some() {
                    metrics::live_migration("stayed", "finished");
                }
                if let Some((_, _, g)) = &mut moved {
                    g.done = true;
                }
                return Ok(true);
            }
        }
    }

    /// The prompt and every token generated so far.
    fn tokens(&self) -> Vec<u32> {
        self.v.prompt.iter().chain(&self.generated).copied().collect()
    }

    /// What a live migration's reservations ask for this choice.
    fn live_request(&self) -> live::Request {
        let mut sampling = self.v.sampling.clone();
        sampling.seed = sampling.seed.map(|x| x.wrapping_add(self.index as u64));
        live::Request { v: self.v.clone(), sampling }
    }

    /// A live migration given up for `why` (`frozen`: after the freeze). The request stays
    /// where it was (thawed); or, when its worker is leaving and another decode worker
    /// serves the model, the attempt ends as that worker's failure, and the choice moves
    /// by recompute.
    async fn give_up(
        &self,
        l: live::InFlight,
        why: live::GiveUp,
        from: &live::Source,
        frozen: bool,
    ) -> Result<(), AttemptError> {
        let r = &self.routing;
        tracing::info!(
            request = ?self.v.request_id, choice = self.index, worker = %from.id, reason = why.as_str(),
            required = l.required, "live migration given up"
        );
        if l.required && r.migration_limit > 0 && r.members.has_other_decode(&self.v.model, &from.id, &[]) {
            metrics::live_migration("recomputed", why.as_str());
            let status = Status::unavailable(format!(
                "decode worker {} is leaving and the request's KV could not move ({}); recomputing it elsewhere",
                from.id,
                why.as_str()
            ));
            return Err(AttemptError { status, fault: Fault::Worker(from.id.clone()) });
        }
        // The worker learns the move is over either way (it may ask again).
        if !live::resume(from).await && frozen {
            metrics::live_migration("recomputed", why.as_str());
            let status = Status::unavailable(format!("decode worker {} lost the request during its move", from.id));
            return Err(AttemptError { status, fault: Fault::Worker(from.id.clone()) });
        }
        metrics::live_migration("stayed", why.as_str());
        Ok(())
    }

    /// The one conversion of a worker's chunk into the client's: `prefill` (with an
    /// attempt's first chunk) drew the first token and scored the prompt, so its
    /// log-probabilities go in; `opening` marks the choice's first chunk, which carries the
    /// prefill's timing and the cached prompt tokens.
    fn chunk(&mut self, d: pb::DecodeResponse, prefill: Option<pb::PrefillResponse>, opening: bool) -> Chunk {
        let mut out = api::GenerateStreamResponse {
            index: self.index,
            text: d.text,
            token_ids: d.token_ids,
            logprobs: d.logprobs,
            finish_reason: d.finish_reason,
            usage: None,
            timing: None,
            request_id: self.v.request_id.clone(),
            model: self.v.model.clone(),
            prompt_logprobs: d.prompt_logprobs,
        };
        let (mut cached_tokens, mut timing) = (d.cached_tokens, None);
        if let Some(p) = prefill {
            if let Some(lp) = p.logprobs {
                if out.logprobs.len() < out.token_ids.len() {
                    out.logprobs.insert(0, lp);
                }
            }
            out.prompt_logprobs = p.prompt_logprobs;
            cached_tokens = p.cached_tokens;
            timing = p.timing;
        }
        self.generated.extend(&out.token_ids);
        Chunk {
            out,
            prefill: if opening { timing } else { None },
            cached_tokens: if opening { cached_tokens } else { 0 },
        }
    }
}
