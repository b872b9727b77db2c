//! The simulated cluster: a discrete-event loop over N prefill, M decode and K role-`both`
//! workers and one router, on a clock of whole nanoseconds.
//!
//! What decides is the project's own code, not a copy of it:
//! - each worker is the engine's `Scheduler` over its `BlockManager` (continuous batching,
//!   chunked prefill, preemption, the prefix cache, the `fcfs`/`priority`/`fair`/`sjf`
//!   policies), stepped with the simulator's clock;
//! - the router places each request with `pick::choose` (the routing policy, the
//!   per-request placement of `PlacementControl`), reads the `PrefixIndex` that the workers'
//!   KV events feed (converted as a worker converts them), counts what it has in flight per
//!   worker as `Members` does, admits through `Admission` and, when asked, `slo::decide`.
//!
//! What is modelled, not run: the forward pass (a step takes what the cost model says of the
//! tokens it computes), KV transfer (a link's latency and bandwidth, all but the last
//! layer's share hidden behind the prefill, as the layer-wise transfer does), and the
//! router's own work and each control hop (constants of the cost model). Load reports
//! reach the router every `LOAD_INTERVAL`, as its pollers fetch them; KV events at the end
//! of the step that made them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::Role;
use tandem_engine::scheduler::{NewRequest, RequestId, Sampled, SchedulerConfig};
use tandem_engine::share::Share;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_router::admission::{Admission, Permit};
use tandem_router::index::PrefixIndex;
use tandem_router::members::{LOAD_INTERVAL, PENDING_TTL};
use tandem_router::pick::{self, Pick, Seen};
use tandem_router::placement::{PlacementConfig, PlacementControl};
use tandem_router::policy::RoutingPolicy;
use tandem_router::quota::Quotas;
use tandem_router::slo;
use tandem_worker_runtime::convert::kv_event_to_pb;

use super::cost::{Costs, Link, StepShape};
use super::worker::{JobKind, Worker, MODEL};

/// One request as the workload sends it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Seconds from the start.
    pub at: f64,
    pub prompt: Vec<u32>,
    pub output_len: u32,
    pub tenant: Option<Arc<str>>,
    pub phase: Option<u32>,
}

/// The cluster and its settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub prefill: usize,
    pub decode: usize,
    /// Workers of role `both` (they decode, and prefill when placement says so or when no
    /// prefill worker exists).
    pub both: usize,
    /// Routing policy (`cache-aware`, `least-loaded`, `round-robin`) and its cache weight.
    pub policy: String,
    pub cache_weight: f64,
    pub placement: PlacementConfig,
    /// The engines' schedulers: prefill workers', and decode (and `both`) workers'.
    pub prefill_sched: SchedulerConfig,
    pub decode_sched: SchedulerConfig,
    pub prefix_caching: bool,
    /// The link KV crosses between a prefill and a decode worker.
    pub link: Link,
    /// How long a request waits for KV room when every decode pool is full.
    pub kv_wait: Duration,
    /// The router's in-flight limit (`--max-inflight`).
    pub max_inflight: usize,
    /// Refuse requests predicted to miss this TTFT (`slo::decide`); `None`: admit all.
    pub slo_admission_ttft: Option<Duration>,
    /// Requests still out at this many seconds count as failed (`None`: run to the end).
    pub horizon: Option<f64>,
    /// Workers share this many cores (worker i, in the order prefill, decode, both, on core
    /// i mod cores): a step takes as many times its cost as workers on its core are busy
    /// when it starts. `None`: every worker has its own hardware.
    pub cores: Option<usize>,
    /// Closed loop: this many requests out at once, the next sent when one ends (arrival
    /// times ignored), as `bench serve --concurrency`. `None`: open loop, at the arrivals.
    pub concurrency: Option<usize>,
}

/// What one request came to.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub ok: bool,
    pub refused: bool,
    pub error: Option<String>,
    /// Seconds from the start.
    pub sent: f64,
    pub first: Option<f64>,
    pub end: Option<f64>,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub output_tokens: usize,
    /// Gaps between consecutive tokens after the first, seconds.
    pub itl: Vec<f64>,
    /// The workers it went to: its prefill worker (`None`: prefilled where it decoded) and
    /// where it decoded.
    pub prefill_on: Option<String>,
    pub decode_on: Option<String>,
    pub tenant: Option<Arc<str>>,
    pub phase: Option<u32>,
}

/// A finished simulation.
#[derive(Debug, Clone)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
    /// Simulated seconds from the first arrival to the last event.
    pub span_s: f64,
    pub events: u64,
    pub steps: u64,
    /// Each worker's id, its steps and its busy seconds.
    pub workers: Vec<(String, u64, f64)>,
    /// KV blocks still held by a request, and requests still inside an engine, over every
    /// worker at the end (both 0 after a run to its end).
    pub held_blocks: usize,
    pub left_in_engines: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrive(usize),
    StepDone(usize),
    KvArrived(usize),
    Dispatch(usize),
    RoomDeadline(usize),
    Poll,
}

#[derive(Default)]
struct Req {
    out: Outcome,
    prompt: Vec<u32>,
    output_len: u32,
    hashes: Vec<u64>,
    permit: Option<Permit>,
    /// Prompt tokens charged to the worker that computes it, until it has.
    charge: u64,
    computes_on: Option<usize>,
    decode_on: Option<usize>,
    decode_id: Option<RequestId>,
    /// Tokens the decode worker held of the prompt already (not sent).
    decode_cached: usize,
    first_token: u32,
    /// Waiting for KV room since.
    room_since: Option<u64>,
    /// When its last token reached the client (seconds).
    last_token: Option<f64>,
    /// What the router's call will hand the computing worker when it arrives.
    dispatch: Option<(NewRequest, JobKind)>,
}

impl Req {
    /// A token after the first reached the client at `t`.
    fn token_at(&mut self, t: f64) {
        let last = self.last_token.or(self.out.first).unwrap_or(t);
        self.out.itl.push((t - last).max(0.0));
        self.last_token = Some(t);
    }
}

fn ns(secs: f64) -> u64 {
    (secs.max(0.0) * 1e9).round() as u64
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Why a route did not go through.
enum Refusal {
    /// Every decode pool is full: wait for room.
    NoRoom,
    Failed {
        refused: bool,
        error: String,
    },
}

pub struct World {
    cfg: Config,
    costs: Costs,
    policy: Box<dyn RoutingPolicy>,
    placement: PlacementControl,
    index: PrefixIndex,
    admission: Arc<Admission>,
    ttft: slo::TtftModel,
    workers: Vec<Worker>,
    reqs: Vec<Req>,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    seq: u64,
    now: u64,
    base: Instant,
    room: VecDeque<usize>,
    open: usize,
    events: u64,
    /// Closed loop: the next request to send.
    next_closed: usize,
}

impl World {
    pub fn new(cfg: Config, costs: Costs) -> anyhow::Result<World> {
        if cfg.prefill + cfg.decode + cfg.both == 0 || cfg.decode + cfg.both == 0 {
            anyhow::bail!("a cluster needs a worker that decodes (--decode or --both)");
        }
        if cfg.prefill > 0 && cfg.decode == 0 && cfg.both == 0 {
            anyhow::bail!("prefill workers need a decode worker");
        }
        let policy = tandem_router::policy::policy_by_name(&cfg.policy, cfg.cache_weight)
            .ok_or_else(|| anyhow::anyhow!("unknown routing policy {:?}", cfg.policy))?;
        let mut workers = Vec::new();
        let roles = [
            (Role::Prefill, cfg.prefill, "prefill"),
            (Role::Decode, cfg.decode, "decode"),
            (Role::Both, cfg.both, "both"),
        ];
        for (role, n, name) in roles {
            for i in 0..n {
                let sched_cfg =
                    if role == Role::Prefill { cfg.prefill_sched.clone() } else { cfg.decode_sched.clone() };
                workers.push(Worker::new(role, format!("{name}-{i:03}"), sched_cfg, &costs, cfg.prefix_caching)?);
            }
        }
        let mut index = PrefixIndex::new();
        for w in &mut workers {
            // A worker's KV event stream opens with its (empty) snapshot.
            let snapshot = pb::KvEvent {
                event_id: 1,
                event: Some(pb::kv_event::Event::Snapshot(pb::KvSnapshot { block_hashes: Vec::new(), last: true })),
            };
            index.apply(&w.desc.id, &snapshot).expect("a fresh snapshot");
            w.next_event = 2;
        }
        Ok(World {
            placement: PlacementControl::new(cfg.placement),
            admission: Arc::new(Admission::new(cfg.max_inflight, Quotas::default())),
            ttft: slo::TtftModel::default(),
            policy,
            index,
            workers,
            reqs: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            now: 0,
            base: Instant::now(),
            room: VecDeque::new(),
            open: 0,
            events: 0,
            next_closed: 0,
            cfg,
            costs,
        })
    }

    /// Runs `arrivals` to their end (or the horizon).
    pub fn run(mut self, arrivals: Vec<Arrival>) -> Report {
        for a in arrivals {
            let hashes = self.prompt_hashes(&a.prompt);
            self.reqs.push(Req {
                out: Outcome {
                    sent: a.at,
                    prompt_tokens: a.prompt.len(),
                    tenant: a.tenant,
                    phase: a.phase,
                    ..Outcome::default()
                },
                prompt: a.prompt,
                output_len: a.output_len.max(1),
                hashes,
                ..Req::default()
            });
        }
        match self.cfg.concurrency {
            Some(c) => {
                for _ in 0..c.max(1) {
                    self.send_next(0);
                }
            }
            None => {
                for i in 0..self.reqs.len() {
                    let router = ns(self.reqs[i].out.sent + (self.costs.rpc_ms + self.costs.router_ms) / 1e3);
                    self.push(router, Event::Arrive(i));
                }
            }
        }
        self.open = self.reqs.len();
        self.push(0, Event::Poll);
        let horizon = self.cfg.horizon.map(ns);
        while let Some(Reverse((t, _, ev))) = self.queue.pop() {
            if horizon.is_some_and(|h| t > h) {
                break;
            }
            self.now = t;
            self.events += 1;
            match ev {
                Event::Arrive(r) => self.arrive(r),
                Event::StepDone(w) => self.step_done(w),
                Event::KvArrived(r) => self.kv_arrived(r),
                Event::Dispatch(r) => self.dispatch(r),
                Event::RoomDeadline(r) => self.room_deadline(r),
                Event::Poll => {
                    self.poll();
                    if self.open > 0 {
                        self.push(self.now + LOAD_INTERVAL.as_nanos() as u64, Event::Poll);
                    }
                }
            }
        }
        let start = self.reqs.iter().map(|r| r.out.sent).fold(f64::INFINITY, f64::min);
        let end = self.reqs.iter().filter_map(|r| r.out.end).fold(secs(self.now), f64::max);
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(self.reqs.len());
        for r in &mut self.reqs {
            r.permit = None;
            let mut o = std::mem::take(&mut r.out);
            if !o.ok && !o.refused && o.error.is_none() {
                o.error = Some("did not finish within the simulated horizon".into());
            }
            outcomes.push(o);
        }
        Report {
            outcomes,
            span_s: end - if start.is_finite() { start } else { 0.0 },
            events: self.events,
            steps: self.workers.iter().map(|w| w.steps).sum(),
            workers: self.workers.iter().map(|w| (w.desc.id.as_str().to_string(), w.steps, secs(w.busy_ns))).collect(),
            held_blocks: self.workers.iter().map(|w| w.sched.blocks.n_used()).sum(),
            left_in_engines: self.workers.iter().map(|w| w.jobs.len() + usize::from(w.sched.has_unfinished())).sum(),
        }
    }

    fn push(&mut self, at: u64, ev: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    /// The prompt's reusable blocks as the router names them (`Members::prompt_hashes`).
    fn prompt_hashes(&self, prompt: &[u32]) -> Vec<u64> {
        let usable = &prompt[..prompt.len().saturating_sub(1)];
        tandem_text::prefix::prefix_hashes(usable, self.costs.block_size, None).into_iter().map(|h| h.0).collect()
    }

    fn arrive(&mut self, r: usize) {
        match self.admission.admit(None) {
            Ok(p) => self.reqs[r].permit = Some(p),
            Err(e) => return self.fail(r, true, e.message().to_string()),
        }
        self.route(r);
    }

    /// Places request `r` and hands it to its workers; waits for KV room or fails.
    fn route(&mut self, r: usize) {
        match self.try_route(r) {
            Ok(()) => {}
            Err(Refusal::NoRoom) => {
                if self.cfg.kv_wait.is_zero() {
                    return self.fail(r, true, "no decode worker has KV room".into());
                }
                if self.reqs[r].room_since.is_none() {
                    self.reqs[r].room_since = Some(self.now);
                    let deadline = self.now + self.cfg.kv_wait.as_nanos() as u64;
                    self.push(deadline, Event::RoomDeadline(r));
                }
                self.room.push_back(r);
            }
            Err(Refusal::Failed { refused, error }) => self.fail(r, refused, error),
        }
    }

    fn try_route(&mut self, r: usize) -> Result<(), Refusal> {
        let now = self.instant();
        let block = self.costs.block_size;
        let prompt_len = self.reqs[r].prompt.len();
        let (pick, prefill_ids, decode_ids, seen_cached) = {
            let hashes = &self.reqs[r].hashes;
            let seen = |i: usize| -> Seen<'_> {
                let w = &self.workers[i];
                Seen {
                    desc: &w.desc,
                    stats: w.published.as_ref(),
                    inflight: w.inflight,
                    inflight_tokens: w.inflight_tokens,
                    cached: Some(self.index.overlap(&w.desc.id, hashes, now) * block),
                    indexed_blocks: self.index.blocks(&w.desc.id),
                }
            };
            let prefill_ids: Vec<usize> =
                (0..self.workers.len()).filter(|&i| self.workers[i].desc.role == Role::Prefill).collect();
            let decode_ids: Vec<usize> =
                (0..self.workers.len()).filter(|&i| self.workers[i].desc.role.can_decode()).collect();
            let sort =
                |ids: &mut Vec<usize>| ids.sort_by(|&a, &b| self.workers[a].desc.id.cmp(&self.workers[b].desc.id));
            let (mut prefill_ids, mut decode_ids) = (prefill_ids, decode_ids);
            sort(&mut prefill_ids);
            sort(&mut decode_ids);
            let sp: Vec<Seen> = prefill_ids.iter().map(|&i| seen(i)).collect();
            let sd: Vec<Seen> = decode_ids.iter().map(|&i| seen(i)).collect();
            let pick = pick::choose(self.policy.as_ref(), &self.placement, MODEL, prompt_len, &sp, &sd, now)
                .map_err(|e| Refusal::Failed { refused: false, error: e.message().to_string() })?;
            let cached: HashMap<usize, usize> = prefill_ids
                .iter()
                .zip(&sp)
                .chain(decode_ids.iter().zip(&sd))
                .map(|(&i, s)| (i, s.cached.unwrap_or(0)))
                .collect();
            (pick, prefill_ids, decode_ids, cached)
        };
        let (computes, decodes) = match pick {
            Pick::Disaggregated { prefill, decode } => (prefill_ids[prefill], decode_ids[decode]),
            Pick::Local(d) => (decode_ids[d], decode_ids[d]),
        };
        let predicted = seen_cached[&computes];
        let charge = prompt_len.saturating_sub(predicted) as u64;
        // SLO admission, as a choice does it: the queue ahead on the computing worker.
        if let Some(objective) = self.cfg.slo_admission_ttft {
            let w = &self.workers[computes];
            let others = w.published.as_ref().map_or(0, |s| s.queued_prefill_tokens.saturating_sub(w.inflight_tokens));
            let predicted_ttft = slo::predict(&slo::Inputs {
                ahead_tokens: w.inflight_tokens + others,
                uncached: charge,
                prefill_rate: self.placement.prefill_rate(),
                residual: self.ttft.residual(),
            });
            if let slo::Verdict::Refuse { .. } = slo::decide(predicted_ttft, Some(objective)) {
                return Err(Refusal::Failed { refused: true, error: "predicted to miss its TTFT objective".into() });
            }
        }
        let share = Share { tenant: self.reqs[r].out.tenant.clone(), predicted_output: None, elsewhere: 0.0 };
        let new = |max_tokens: usize, prompt: Vec<u32>| NewRequest {
            id: RequestId(0),
            prompt,
            max_tokens,
            stop_ids: Vec::new(),
            priority: 0,
            cache_salt: None,
            share: share.clone(),
        };
        let output_len = self.reqs[r].output_len as usize;
        let prompt = self.reqs[r].prompt.clone();
        // The router's calls: to a role-both worker, one hop; to a pair, the decode
        // worker's reservation (a round trip), then the prefill call.
        let hop = ns(self.costs.rpc_ms / 1e3);
        let dispatch_at = if computes == decodes {
            self.reqs[r].dispatch = Some((new(output_len, prompt), JobKind::Local));
            self.now + hop
        } else {
            let (id, cached) = match self.workers[decodes].add_remote(new(output_len, prompt.clone()), r) {
                Ok(x) => x,
                Err(true) => return Err(Refusal::NoRoom),
                Err(false) => return Err(Refusal::Failed { refused: true, error: "the decode worker refused".into() }),
            };
            self.reqs[r].decode_id = Some(id);
            self.reqs[r].decode_cached = cached * block;
            self.reqs[r].dispatch = Some((new(1, prompt), JobKind::Prefill));
            self.workers[computes].inflight += 1;
            self.reqs[r].out.prefill_on = Some(self.workers[computes].desc.id.as_str().to_string());
            // The reservation is an engine command: the decode worker takes it between steps.
            let d = &self.workers[decodes];
            let taken = if d.stepping.is_some() { d.step_ends.max(self.now + hop) } else { self.now + hop };
            taken + 2 * hop
        };
        self.placement.observe_prompt_at(charge as usize, now);
        let until = now + PENDING_TTL;
        let hashes = std::mem::take(&mut self.reqs[r].hashes);
        for w in [computes, decodes] {
            self.index.add_pending(&self.workers[w].desc.id, &hashes, now, until);
        }
        self.workers[computes].inflight_tokens += charge;
        self.workers[decodes].inflight += 1;
        let q = &mut self.reqs[r];
        q.charge = charge;
        q.computes_on = Some(computes);
        q.decode_on = Some(decodes);
        q.out.decode_on = Some(self.workers[decodes].desc.id.as_str().to_string());
        q.room_since = None;
        self.push(dispatch_at, Event::Dispatch(r));
        Ok(())
    }

    /// The router's call reaches the worker that computes request `r`'s prompt.
    fn dispatch(&mut self, r: usize) {
        let (Some((new, kind)), Some(w)) = (self.reqs[r].dispatch.take(), self.reqs[r].computes_on) else { return };
        let guess = self.reqs[r].charge as usize;
        match self.workers[w].add(new, r, kind, guess) {
            Ok(id) => {
                if kind == JobKind::Local {
                    self.reqs[r].decode_id = Some(id);
                }
                self.kick(w);
            }
            Err((e, refused)) => {
                // Refused by the engine: nothing of it stays anywhere.
                self.release_charge(r);
                if let Some(d) = self.reqs[r].decode_on {
                    if kind == JobKind::Prefill {
                        self.workers[w].inflight = self.workers[w].inflight.saturating_sub(1);
                        if let Some(id) = self.reqs[r].decode_id {
                            self.workers[d].drop_job(id);
                        }
                    }
                    self.workers[d].inflight = self.workers[d].inflight.saturating_sub(1);
                }
                self.fail(r, refused, e);
                self.room_freed();
            }
        }
    }

    /// When what happens on a worker now reaches the client (worker to router to client).
    fn to_client(&self) -> f64 {
        secs(self.now) + 2.0 * self.costs.rpc_ms / 1e3
    }

    fn fail(&mut self, r: usize, refused: bool, error: String) {
        let q = &mut self.reqs[r];
        q.out.refused = refused;
        q.out.error = Some(error);
        q.permit = None;
        q.room_since = None;
        self.open -= 1;
        self.send_next(self.now + ns(2.0 * self.costs.rpc_ms / 1e3));
    }

    /// Closed loop: a request ended (its client hears at `at`) or the run starts, so the
    /// next one is sent then.
    fn send_next(&mut self, at: u64) {
        if self.cfg.concurrency.is_none() || self.next_closed >= self.reqs.len() {
            return;
        }
        let i = self.next_closed;
        self.next_closed += 1;
        self.reqs[i].out.sent = secs(at);
        self.push(at + ns((self.costs.rpc_ms + self.costs.router_ms) / 1e3), Event::Arrive(i));
    }

    fn room_deadline(&mut self, r: usize) {
        if self.reqs[r].room_since.is_some() {
            self.room.retain(|&x| x != r);
            self.fail(r, true, "no decode worker had KV room within the wait".into());
        }
    }

    /// A decode worker freed blocks: the longest-waiting request tries again.
    fn room_freed(&mut self) {
        if let Some(r) = self.room.pop_front() {
            self.route(r);
        }
    }

    /// Starts a step on worker `w` if it is idle and has work.
    fn kick(&mut self, w: usize) {
        let worker = &mut self.workers[w];
        if worker.stepping.is_some() || !worker.sched.has_unfinished() {
            return;
        }
        worker.sched.set_clock(self.now / 1_000_000);
        let plan = worker.sched.schedule();
        if plan.is_empty() {
            return;
        }
        for s in &plan.scheduled {
            if let Some(j) = worker.jobs.get_mut(&s.id) {
                j.first_step.get_or_insert(self.now);
            }
        }
        let mut dur = ns(self.costs.step.seconds(&StepShape::of_plan(&plan))).max(1);
        worker.stepping = Some(plan);
        if let Some(cores) = self.cfg.cores.filter(|&c| c > 0) {
            let sharing = (0..self.workers.len())
                .filter(|&i| i % cores == w % cores && self.workers[i].stepping.is_some())
                .count();
            dur *= sharing.max(1) as u64;
        }
        let worker = &mut self.workers[w];
        worker.steps += 1;
        worker.busy_ns += dur;
        worker.step_ends = self.now + dur;
        self.push(self.now + dur, Event::StepDone(w));
    }

    fn step_done(&mut self, w: usize) {
        let plan = self.workers[w].stepping.take().expect("a step was running");
        let sampled: Vec<(RequestId, Sampled)> = plan
            .scheduled
            .iter()
            .filter(|s| s.sample)
            .map(|s| (s.id, Sampled::one(token_for(s.id, s.start + s.len))))
            .collect();
        let client = self.to_client();
        let worker = &mut self.workers[w];
        let draws: Vec<Sampled> = sampled.iter().map(|(_, s)| s.clone()).collect();
        let finished: HashMap<RequestId, ()> =
            worker.sched.update(&plan, &draws).into_iter().map(|(id, _)| (id, ())).collect();
        let mut ended = Vec::new();
        let mut transfers = Vec::new();
        let mut prefills = Vec::new();
        for (id, s) in &sampled {
            let Some(job) = worker.jobs.get(id).copied() else { continue };
            let r = &mut self.reqs[job.req];
            let cached = worker.sched.get(*id).map_or(0, |x| x.cached_tokens);
            match job.kind {
                JobKind::Prefill => {
                    // The client's first token comes from the decode worker, once the KV is there.
                    r.out.cached_tokens = cached;
                    r.out.output_tokens = 1;
                    r.first_token = s.token;
                    let compute = self.now - job.first_step.unwrap_or(self.now);
                    prefills.push((r.prompt.len() - cached, compute));
                    transfers.push((job.req, compute));
                }
                JobKind::Local => {
                    if r.out.first.is_none() {
                        r.out.first = Some(client);
                        r.out.cached_tokens = cached;
                        prefills.push((r.prompt.len() - cached, self.now - job.first_step.unwrap_or(self.now)));
                    } else {
                        r.token_at(client);
                    }
                    r.out.output_tokens += 1;
                }
                JobKind::Decode => {
                    r.token_at(client);
                    r.out.output_tokens += 1;
                }
            }
            if finished.contains_key(id) {
                worker.jobs.remove(id);
                worker.sched.take_finished(*id);
                ended.push((job.req, job.kind));
            }
        }
        // Requests preempted and finished otherwise (none here: no aborts) leave no jobs.
        self.events_of(w);
        for (tokens, compute) in prefills {
            self.placement.observe_prefill(tokens, Duration::from_nanos(compute));
        }
        for (r, kind) in ended {
            match kind {
                JobKind::Prefill => {
                    // The prefill answered: its worker no longer counts it.
                    let wk = &mut self.workers[w];
                    wk.inflight = wk.inflight.saturating_sub(1);
                    self.release_charge(r);
                }
                _ => self.finish(r),
            }
        }
        for (r, compute) in transfers {
            let bytes = (self.reqs[r].prompt.len() - self.reqs[r].decode_cached.min(self.reqs[r].prompt.len())) as f64
                * self.costs.kv_bytes_per_token;
            let link = self.cfg.link;
            let whole = link.seconds(bytes);
            let last_layer = link.seconds(bytes / self.costs.layers as f64);
            let after = last_layer.max(whole - secs(compute));
            self.push(self.now + ns(after), Event::KvArrived(r));
        }
        // A local request's first token: its prompt no longer counts as queued there.
        let locals: Vec<usize> = self.workers[w]
            .jobs
            .values()
            .filter(|j| j.kind == JobKind::Local && self.reqs[j.req].out.first.is_some() && self.reqs[j.req].charge > 0)
            .map(|j| j.req)
            .collect();
        for r in locals {
            self.release_charge(r);
        }
        for r in std::mem::take(&mut self.workers[w].kv_ready) {
            self.kv_taken(r);
        }
        self.kick(w);
    }

    /// The prompt of `r` is computed: its charge leaves its worker's queued tokens.
    fn release_charge(&mut self, r: usize) {
        let c = std::mem::take(&mut self.reqs[r].charge);
        if let Some(w) = self.reqs[r].computes_on {
            self.workers[w].inflight_tokens = self.workers[w].inflight_tokens.saturating_sub(c);
        }
    }

    /// Request `r` generated its last token on its decode (or local) worker.
    fn finish(&mut self, r: usize) {
        let client = self.to_client();
        self.release_charge(r);
        let now = self.instant();
        let q = &mut self.reqs[r];
        q.out.end = Some(client);
        q.out.ok = true;
        q.permit = None;
        let (first, end) = (q.out.first.unwrap_or(q.out.sent), client);
        let ttft = Duration::from_secs_f64((first - q.out.sent).max(0.0));
        let n = q.out.output_tokens as u32;
        let tpot = (n > 1).then(|| Duration::from_secs_f64((end - first).max(0.0) / f64::from(n - 1)));
        self.placement.observe_finished_at(ttft, tpot, n, now);
        if let Some(d) = q.decode_on {
            self.workers[d].inflight = self.workers[d].inflight.saturating_sub(1);
        }
        self.open -= 1;
        self.send_next(ns(client));
        self.room_freed();
    }

    /// Request `r`'s KV is on its decode worker. The engine thread takes it between steps:
    /// now if idle, else when its step ends.
    fn kv_arrived(&mut self, r: usize) {
        let Some(d) = self.reqs[r].decode_on else { return };
        if self.workers[d].stepping.is_some() {
            self.workers[d].kv_ready.push(r);
            return;
        }
        self.kv_taken(r);
        self.kick(d);
    }

    /// The decode worker takes request `r`'s KV: the request joins its batch, and the first
    /// token (the prefill worker's) goes out to the client.
    fn kv_taken(&mut self, r: usize) {
        let (Some(d), Some(id)) = (self.reqs[r].decode_on, self.reqs[r].decode_id) else { return };
        self.reqs[r].out.first = Some(self.to_client());
        let first = self.reqs[r].first_token;
        let done = self.workers[d].sched.remote_kv_ready(id, first).expect("a reservation waiting for its KV");
        if done.is_some() {
            self.workers[d].jobs.remove(&id);
            self.workers[d].sched.take_finished(id);
            self.events_of(d);
            self.finish(r);
        } else {
            self.events_of(d);
        }
    }

    /// Worker `w`'s new KV events, into the router's index.
    fn events_of(&mut self, w: usize) {
        let worker = &mut self.workers[w];
        for e in worker.sched.blocks.take_events() {
            let pe = kv_event_to_pb(e, worker.next_event);
            worker.next_event += 1;
            self.index.apply(&worker.desc.id, &pe).expect("events in order");
        }
    }

    /// Every worker's load report, as the router's pollers fetch it.
    fn poll(&mut self) {
        for w in &mut self.workers {
            w.published = Some(w.report());
        }
    }
}

/// A token id for request `id`'s sample at position `pos`: any non-stop id does (the
/// simulated requests have none), varied so generated blocks hash apart.
fn token_for(id: RequestId, pos: usize) -> u32 {
    200 + ((id.0.wrapping_mul(7919) + pos as u64 * 104_729) % 30_000) as u32
}

#[cfg(test)]
#[path = "world_tests.rs"]
mod tests;
