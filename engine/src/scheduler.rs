//! The scheduler: a function from state to a plan, then an update from results.
//!
//! There is no prefill or decode phase: a request has `num_computed` of its
//! `num_tokens` (prompt + output) in the KV cache, and each step schedules up
//! to `num_tokens - num_computed` of them within a token budget. Running
//! requests go first (their single decode tokens, or the rest of a chunked
//! prompt); waiting ones fill what is left of the budget, in policy order,
//! starting after their prefix-cache hit. Long prefills (more than
//! `long_prefill_threshold` tokens to compute) together take at most
//! `long_prefill_share` percent of the budget while a shorter prompt is pending,
//! so the step that gives it its first token stays short; otherwise they take
//! the whole budget. When blocks run out the newest
//! running request is preempted (its blocks freed, to be recomputed later
//! with the tokens it has generated). Pure and synchronous: the engine loop
//! runs the plan through the model and samples.

use std::collections::{HashMap, VecDeque};

use crate::block_manager::{BlockManager, SeqBlocks};
use crate::error::EngineError;
use crate::finish::FinishReason;
use crate::kv_cache::BlockId;
use crate::share::{sjf_key, sjf_rank, FairConfig, Share, SjfConfig, Stage, Vtc};

/// A request's id, unique within one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Waiting,
    Running,
    /// Preempted and waiting to be recomputed.
    Preempted,
    /// Blocks reserved; the KV of the prompt is being sent by another worker.
    WaitingForRemoteKv,
    /// Stopped between two steps with its blocks held: its KV is moving to another
    /// worker (live migration). Not scheduled, not preempted.
    Frozen,
    Finished(FinishReason),
}

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens computed per step at most.
    pub max_batched_tokens: usize,
    /// Sequences running at once at most.
    pub max_seqs: usize,
    /// Requests waiting at most (admission control).
    pub max_waiting: usize,
    /// Longest prompt accepted.
    pub max_prompt_len: usize,
    /// Context length of the model: prompt + output never exceed it.
    pub max_model_len: usize,
    /// The order of admission and preemption (`Fcfs` by default).
    pub policy: Policy,
    /// A prefill with more tokens than this left to compute is long: it yields step
    /// budget to shorter pending prompts, so one huge prompt does not hold everyone's
    /// first token behind it.
    pub long_prefill_threshold: usize,
    /// Percent (1..=100) of `max_batched_tokens` long prefills take at most, together, in a
    /// step while a shorter prompt is pending; the rest is the shorter prompts'. 100 turns
    /// the yielding off (plain first come, first served).
    pub long_prefill_share: usize,
    /// Costs and tenant weights of `Policy::Fair`.
    pub fair: FairConfig,
    /// Aging of `Policy::Sjf`.
    pub sjf: SjfConfig,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batched_tokens: 512,
            max_seqs: 64,
            max_waiting: 1024,
            max_prompt_len: 8191,
            max_model_len: 8192,
            policy: Policy::Fcfs,
            long_prefill_threshold: 512,
            long_prefill_share: 25,
            fair: FairConfig::default(),
            sjf: SjfConfig::default(),
        }
    }
}

/// What a policy may look at besides the request: the scheduler's clock and the
/// tenants' counters.
#[derive(Debug, Clone, Copy)]
pub struct PolicyContext<'a> {
    /// The scheduler's clock (ms, `Scheduler::set_clock`).
    pub now_ms: u64,
    pub vtc: &'a Vtc,
    pub sjf: &'a SjfConfig,
}

/// Orders requests: waiting ones are admitted smallest key first, and the running
/// request with the largest key is preempted first. When more requests run than a step
/// takes (`max_seqs`), the smallest keys run.
pub trait SchedulingPolicy: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn key(&self, r: &Request, cx: &PolicyContext<'_>) -> (i64, u64);
}

/// First come, first served.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fcfs;

impl SchedulingPolicy for Fcfs {
    fn name(&self) -> &'static str {
        "fcfs"
    }
    fn key(&self, r: &Request, _: &PolicyContext<'_>) -> (i64, u64) {
        (0, r.arrival)
    }
}

/// Lower `priority` value first, then arrival.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByPriority;

impl SchedulingPolicy for ByPriority {
    fn name(&self) -> &'static str {
        "priority"
    }
    fn key(&self, r: &Request, _: &PolicyContext<'_>) -> (i64, u64) {
        (r.priority as i64, r.arrival)
    }
}

/// The tenant with the least virtual token counter first (`share`), then arrival.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fair;

impl SchedulingPolicy for Fair {
    fn name(&self) -> &'static str {
        "fair"
    }
    fn key(&self, r: &Request, cx: &PolicyContext<'_>) -> (i64, u64) {
        ((cx.vtc.key(r.share.tenant.as_ref()) * 1000.0) as i64, r.arrival)
    }
}

/// The least expected remaining work first, aged by the wait (`share::sjf_rank`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ShortestFirst;

impl SchedulingPolicy for ShortestFirst {
    fn name(&self) -> &'static str {
        "sjf"
    }
    fn key(&self, r: &Request, cx: &PolicyContext<'_>) -> (i64, u64) {
        let prompt_left = r.prompt.len().saturating_sub(r.num_computed);
        let rank = sjf_rank(prompt_left, r.share.predicted_output, r.max_tokens, r.output.len());
        sjf_key(rank, cx.now_ms.saturating_sub(r.queued_ms), cx.sjf, r.arrival)
    }
}

/// The policy a scheduler runs: one of the built-in ones, or any other implementation.
#[derive(Debug, Clone, Default)]
pub enum Policy {
    #[default]
    Fcfs,
    Priority,
    /// Virtual token counters per tenant (`share::Vtc`).
    Fair,
    /// Shortest (predicted) job first, with aging.
    Sjf,
    Custom(std::sync::Arc<dyn SchedulingPolicy>),
}

impl Policy {
    pub fn get(&self) -> &dyn SchedulingPolicy {
        match self {
            Policy::Fcfs => &Fcfs,
            Policy::Priority => &ByPriority,
            Policy::Fair => &Fair,
            Policy::Sjf => &ShortestFirst,
            Policy::Custom(p) => p.as_ref(),
        }
    }

    pub const NAMES: [&'static str; 4] = ["fcfs", "priority", "fair", "sjf"];

    /// One of `NAMES`.
    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "fcfs" => Some(Policy::Fcfs),
            "priority" => Some(Policy::Priority),
            "fair" => Some(Policy::Fair),
            "sjf" => Some(Policy::Sjf),
            _ => None,
        }
    }
}

/// What the scheduler needs to know of a request.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: RequestId,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// Token ids that end the request (EOS unless ignored, plus stop token ids).
    pub stop_ids: Vec<u32>,
    /// Under `Policy::Priority`, lower values are admitted first (vLLM's meaning); `Fcfs`
    /// ignores it.
    pub priority: i32,
    /// Separates tenants in the prefix cache.
    pub cache_salt: Option<String>,
    /// Whose it is and how long it should run (`fair`, `sjf`).
    pub share: Share,
}

/// A request inside the scheduler.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: RequestId,
    pub prompt: Vec<u32>,
    pub output: Vec<u32>,
    pub num_computed: usize,
    pub status: Status,
    pub max_tokens: usize,
    pub stop_ids: Vec<u32>,
    pub priority: i32,
    pub cache_salt: Option<String>,
    pub share: Share,
    /// When it last started waiting (arrival or preemption), on the scheduler's clock.
    pub queued_ms: u64,
    pub blocks: SeqBlocks,
    /// Order of arrival (policies break ties with it).
    pub arrival: u64,
    pub preemptions: u32,
    /// Prompt tokens found in the prefix cache at the last admission.
    pub cached_tokens: usize,
    /// Compute the whole prompt even where the prefix cache holds it (its logits are wanted).
    pub skip_prefix_cache: bool,
}

impl Request {
    pub fn num_tokens(&self) -> usize {
        self.prompt.len() + self.output.len()
    }
    pub fn token(&self, i: usize) -> u32 {
        if i < self.prompt.len() {
            self.prompt[i]
        } else {
            self.output[i - self.prompt.len()]
        }
    }
    pub fn tokens(&self) -> Vec<u32> {
        let mut t = self.prompt.clone();
        t.extend(&self.output);
        t
    }
}

/// One request's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub id: RequestId,
    /// First position computed this step.
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the end of the known tokens: sample a token from its logits.
    pub sample: bool,
}

/// What the engine drew for one sampling entry of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sampled {
    pub token: u32,
    /// Parallel sampling: new requests that start as copies of this one with their own token.
    pub forks: Vec<(RequestId, u32)>,
}

impl Sampled {
    pub fn one(token: u32) -> Self {
        Sampled { token, forks: Vec::new() }
    }
}

/// The plan for one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub scheduled: Vec<Scheduled>,
    /// Block copies to make before the forward pass (copy-on-write).
    pub copies: Vec<(BlockId, BlockId)>,
    pub preempted: Vec<RequestId>,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// Counters the metrics layer exports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub blocks_used: usize,
    pub blocks_total: usize,
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
    pub steps: u64,
    pub scheduled_tokens: u64,
    /// Sum over steps of (allocated slots - filled slots) / allocated slots of running requests.
    pub kv_waste_sum: f64,
}

impl SchedulerStats {
    pub fn mean_kv_waste(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.kv_waste_sum / self.steps as f64
        }
    }
}

#[derive(Debug)]
pub struct Scheduler {
    pub cfg: SchedulerConfig,
    pub blocks: BlockManager,
    requests: HashMap<RequestId, Request>,
    /// Admission order is the policy's; this holds ids not yet running.
    waiting: VecDeque<RequestId>,
    /// Running ids in admission order (newest last: the first preemption victim).
    running: Vec<RequestId>,
    next_arrival: u64,
    stats: SchedulerStats,
    /// Tenants' service and virtual counters (charged under every policy; `Fair` orders by them).
    vtc: Vtc,
    /// Milliseconds on the caller's clock (`set_clock`): what `sjf` ages by.
    now_ms: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Self {
        let cfg_fair = cfg.fair.clone();
        Scheduler {
            cfg,
            blocks,
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            stats: SchedulerStats::default(),
            vtc: Vtc::new(cfg_fair),
            now_ms: 0,
        }
    }

    /// Sets the clock `sjf` ages requests by (ms; the engine passes time since it started).
    pub fn set_clock(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// The tenants' counters and service.
    pub fn tenants(&self) -> &Vtc {
        &self.vtc
    }

    fn context(&self) -> PolicyContext<'_> {
        PolicyContext { now_ms: self.now_ms, vtc: &self.vtc, sjf: &self.cfg.sjf }
    }

    /// Admits a request to the waiting queue, or refuses it with a typed error.
    pub fn add(&mut self, r: NewRequest) -> Result<(), EngineError> {
        self.check_new(&r)?;
        let req = self.make(r, Status::Waiting);
        self.vtc.activate(req.share.tenant.as_ref(), req.share.elsewhere);
        let id = req.id;
        self.requests.insert(id, req);
        self.waiting.push_back(id);
        Ok(())
    }

    /// Admits a request whose prompt KV will arrive from a prefill worker: its
    /// blocks are reserved now and it waits until `remote_kv_ready`. Returns the
    /// prompt's block table and how many of its leading blocks this worker's prefix
    /// cache already holds (their KV need not arrive; never the block of the last
    /// prompt token).
    pub fn add_remote(&mut self, r: NewRequest) -> Result<(Vec<BlockId>, usize), EngineError> {
        self.check_new(&r)?;
        let mut req = self.make(r, Status::WaitingForRemoteKv);
        self.vtc.activate(req.share.tenant.as_ref(), req.share.elsewhere);
        let n = req.prompt.len();
        let hit = self.blocks.lookup_prefix(&req.prompt, req.cache_salt.as_deref());
        let cached = hit.blocks.len();
        self.blocks.take_prefix(&mut req.blocks, hit);
        if let Err(e) = self.blocks.allocate(&mut req.blocks, n) {
            self.blocks.free(&mut req.blocks);
            self.vtc.deactivate(req.share.tenant.as_ref());
            return Err(e);
        }
        let table = req.blocks.table.clone();
        let id = req.id;
        self.requests.insert(id, req);
        self.running.push(id);
        Ok((table, cached))
    }

    /// The prompt's KV has arrived; `first_token` was sampled by the prefill worker.
    pub fn remote_kv_ready(&mut self, id: RequestId, first_token: u32) -> Result<Option<FinishReason>, EngineError> {
        self.kv_arrived(id)?.status = Status::Running;
        Ok(self.append_token(id, first_token))
    }

    /// The KV of cache-only request `id` has arrived: its full blocks go into the prefix
    /// cache and it ends (its blocks are free, cached, for a later request to find).
    pub fn remote_kv_cached(&mut self, id: RequestId) -> Result<(), EngineError> {
        self.kv_arrived(id)?;
        self.finish(id, FinishReason::Stop);
        Ok(())
    }

    /// Remote request `id`'s prompt KV is in its blocks: computed, and its full blocks
    /// registered in the prefix cache.
    fn kv_arrived(&mut self, id: RequestId) -> Result<&mut Request, EngineError> {
        let r = self
            .requests
            .get_mut(&id)
            .ok_or_else(|| EngineError::InvalidRequest(format!("unknown request {}", id.0)))?;
        if r.status != Status::WaitingForRemoteKv {
            return Err(EngineError::InvalidRequest(format!("request {} is not waiting for KV", id.0)));
        }
        r.num_computed = r.prompt.len();
        let tokens = r.tokens();
        let salt = r.cache_salt.clone();
        self.blocks.commit(&mut r.blocks, &tokens, r.prompt.len(), salt.as_deref());
        Ok(r)
    }

    /// Stops decoding request `id` (every token but its last computed) between steps.
    pub fn freeze(&mut self, id: RequestId) -> Result<(), EngineError> {
        let r = self
            .requests
            .get_mut(&id)
            .ok_or_else(|| EngineError::InvalidRequest(format!("unknown request {}", id.0)))?;
        if r.status != Status::Running || r.num_computed + 1 != r.num_tokens() {
            return Err(EngineError::InvalidRequest(format!("request {} is not decoding", id.0)));
        }
        r.status = Status::Frozen;
        Ok(())
    }

    /// A frozen request runs again.
    pub fn thaw(&mut self, id: RequestId) -> Result<(), EngineError> {
        match self.requests.get_mut(&id) {
            Some(r) if r.status == Status::Frozen => {
                r.status = Status::Running;
                Ok(())
            }
            _ => Err(EngineError::InvalidRequest(format!("request {} is not frozen", id.0))),
        }
    }

    fn check_new(&self, r: &NewRequest) -> Result<(), EngineError> {
        if self.requests.contains_key(&r.id) {
            return Err(EngineError::InvalidRequest(format!("duplicate request id {}", r.id.0)));
        }
        if r.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if r.prompt.len() > self.cfg.max_prompt_len || r.prompt.len() >= self.cfg.max_model_len {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens; at most {} are accepted",
                r.prompt.len(),
                self.cfg.max_prompt_len.min(self.cfg.max_model_len - 1)
            )));
        }
        let pool_tokens = self.blocks.n_blocks() * self.blocks.block_size();
        if r.prompt.len() + 1 > pool_tokens {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens; the KV cache holds {pool_tokens}",
                r.prompt.len()
            )));
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(EngineError::Overloaded(format!("{} requests already waiting", self.waiting.len())));
        }
        Ok(())
    }

    fn make(&mut self, r: NewRequest, status: Status) -> Request {
        self.next_arrival += 1;
        Request {
            id: r.id,
            prompt: r.prompt,
            output: Vec::new(),
            num_computed: 0,
            status,
            max_tokens: r.max_tokens.max(1),
            stop_ids: r.stop_ids,
            priority: r.priority,
            cache_salt: r.cache_salt,
            share: r.share,
            queued_ms: self.now_ms,
            blocks: SeqBlocks::default(),
            arrival: self.next_arrival,
            preemptions: 0,
            cached_tokens: 0,
            skip_prefix_cache: false,
        }
    }

    /// Makes request `id` compute its whole prompt, cached or not (prompt scoring).
    pub fn skip_prefix_cache(&mut self, id: RequestId) {
        if let Some(r) = self.requests.get_mut(&id) {
            r.skip_prefix_cache = true;
        }
    }

    pub fn get(&self, id: RequestId) -> Option<&Request> {
        self.requests.get(&id)
    }

    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn stats(&self) -> SchedulerStats {
        let p = self.blocks.stats();
        SchedulerStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            blocks_used: self.blocks.n_used(),
            blocks_total: self.blocks.n_blocks(),
            prefix_queried_tokens: p.queried_tokens,
            prefix_hit_tokens: p.hit_tokens,
            ..self.stats
        }
    }

    /// Decides what runs this step.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget;
        // Tokens long prefills may still take this step.
        let mut long_left = self.long_prefill_cap();

        // Running requests first, oldest first; when more run than a step takes, in policy
        // order (a decode worker's reservations never wait, so this is where they queue).
        let mut order = self.running.clone();
        if !matches!(self.cfg.policy, Policy::Fcfs) {
            let running = order.iter().filter(|id| self.requests[id].status == Status::Running).count();
            if running > self.cfg.max_seqs {
                let (policy, cx) = (self.cfg.policy.get(), self.context());
                order.sort_by_cached_key(|id| policy.key(&self.requests[id], &cx));
            }
        }
        for id in order {
            budget = self.cfg.max_batched_tokens - plan.num_tokens();
            // Forked children join `running` without admission: cap the step here too.
            if budget == 0 || plan.scheduled.len() >= self.cfg.max_seqs {
                break;
            }
            let r = &self.requests[&id];
            if r.status != Status::Running {
                continue; // preempted earlier in this loop, or waiting for remote KV
            }
            let left = r.num_tokens() - r.num_computed;
            let long = left > self.cfg.long_prefill_threshold;
            let want = if long { left.min(budget).min(long_left) } else { left.min(budget) };
            if want == 0 || !self.reserve(id, want, &mut plan) {
                continue;
            }
            if long {
                long_left -= want;
            }
            self.charge_prompt(id, want);
            let r = &self.requests[&id];
            plan.scheduled.push(Scheduled {
                id,
                start: r.num_computed,
                len: want,
                sample: r.num_computed + want == r.num_tokens(),
            });
        }
        budget = self.cfg.max_batched_tokens - plan.num_tokens();

        // Then waiting requests, in policy order, unless this step had to preempt.
        if plan.preempted.is_empty() {
            self.sort_waiting();
            // Index into `waiting`: a long prompt over its share is passed over, not waited on.
            let mut next = 0;
            while budget > 0 && self.running.len() < self.cfg.max_seqs {
                let Some(&id) = self.waiting.get(next) else { break };
                let r = self.requests.get_mut(&id).expect("waiting request exists");
                let tokens = r.tokens();
                let hit = if r.skip_prefix_cache {
                    Default::default()
                } else {
                    self.blocks.lookup_prefix(&tokens, r.cache_salt.as_deref())
                };
                let hit_tokens = hit.tokens(self.blocks.block_size());
                let left = tokens.len() - hit_tokens;
                let long = left > self.cfg.long_prefill_threshold;
                let want = if long { left.min(budget).min(long_left) } else { left.min(budget) };
                if want == 0 {
                    next += 1;
                    continue;
                }
                let need = self.blocks.hit_cost(&hit) + (hit_tokens + want).div_ceil(self.blocks.block_size())
                    - hit.blocks.len();
                if need > self.blocks.n_free() {
                    break;
                }
                let r = self.requests.get_mut(&id).expect("exists");
                self.blocks.take_prefix(&mut r.blocks, hit);
                self.blocks.allocate(&mut r.blocks, hit_tokens + want).expect("counted above");
                r.num_computed = hit_tokens;
                r.cached_tokens = hit_tokens;
                r.status = Status::Running;
                plan.scheduled.push(Scheduled {
                    id,
                    start: hit_tokens,
                    len: want,
                    sample: hit_tokens + want == tokens.len(),
                });
                self.waiting.remove(next);
                self.running.push(id);
                budget -= want;
                if long {
                    long_left -= want;
                }
                self.charge_prompt(id, want);
                if matches!(self.cfg.policy, Policy::Fair) {
                    // The tenant's counter moved: the rest of the queue is ordered again.
                    self.sort_waiting();
                }
            }
        }

        self.stats.steps += 1;
        self.stats.scheduled_tokens += plan.num_tokens() as u64;
        let bs = self.blocks.block_size();
        let (mut alloc, mut filled) = (0usize, 0usize);
        for s in &plan.scheduled {
            let r = &self.requests[&s.id];
            alloc += r.blocks.table.len() * bs;
            filled += s.start + s.len;
        }
        if alloc > 0 {
            self.stats.kv_waste_sum += (alloc - filled.min(alloc)) as f64 / alloc as f64;
        }
        plan
    }

    /// How many tokens long prefills may take this step: `long_prefill_share` percent of
    /// the budget while a short prompt is pending (running with two or more tokens left, or
    /// waiting within the free sequence slots), else the whole budget. Decodes alone do not
    /// hold a long prefill back. Waiting prompts count whole (their prefix-cache hit is not
    /// looked up here).
    fn long_prefill_cap(&self) -> usize {
        let budget = self.cfg.max_batched_tokens;
        let share = (budget * self.cfg.long_prefill_share.clamp(1, 100) / 100).max(1);
        let short = |left: usize| left <= self.cfg.long_prefill_threshold;
        let running = self.running.iter().map(|id| &self.requests[id]).any(|r| {
            let left = r.num_tokens() - r.num_computed;
            r.status == Status::Running && left >= 2 && short(left)
        });
        let slots = self.cfg.max_seqs.saturating_sub(self.running.len());
        let waiting = self.waiting.iter().take(slots).any(|id| short(self.requests[id].num_tokens()));
        if running || waiting {
            share
        } else {
            budget
        }
    }

    /// Makes room for `want` more tokens of running request `id`, preempting the
    /// newest running requests if blocks run out. False if `id` itself was preempted.
    fn reserve(&mut self, id: RequestId, want: usize, plan: &mut StepPlan) -> bool {
        loop {
            let r = self.requests.get_mut(&id).expect("running request exists");
            let start = r.num_computed;
            let mut blocks = std::mem::take(&mut r.blocks);
            let grown = self.blocks.allocate(&mut blocks, start + want);
            let cow = match grown {
                Ok(()) => self.blocks.prepare_write(&mut blocks, start),
                Err(e) => Err(e),
            };
            self.requests.get_mut(&id).expect("exists").blocks = blocks;
            match cow {
                Ok(copy) => {
                    plan.copies.extend(copy);
                    return true;
                }
                Err(_) => {
                    let victim = self.pick_victim();
                    self.preempt(victim);
                    plan.preempted.push(victim);
                    plan.scheduled.retain(|s| s.id != victim);
                    if victim == id {
                        return false;
                    }
                }
            }
        }
    }

    /// Charges the prompt tokens among the `want` computed next for request `id`.
    fn charge_prompt(&mut self, id: RequestId, want: usize) {
        let r = &self.requests[&id];
        let prompt = (r.num_computed + want).min(r.prompt.len()).saturating_sub(r.num_computed);
        self.vtc.charge(r.share.tenant.as_ref(), Stage::Prefill, prompt);
    }

    fn pick_victim(&self) -> RequestId {
        let (policy, cx) = (self.cfg.policy.get(), self.context());
        *self
            .running
            .iter()
            .filter(|id| self.requests[id].status == Status::Running)
            .max_by_key(|id| policy.key(&self.requests[id], &cx))
            .expect("a running request to preempt")
    }

    fn preempt(&mut self, id: RequestId) {
        let r = self.requests.get_mut(&id).expect("exists");
        self.blocks.free(&mut r.blocks);
        r.num_computed = 0;
        r.status = Status::Preempted;
        r.queued_ms = self.now_ms;
        r.preemptions += 1;
        self.stats.preemptions += 1;
        self.running.retain(|&x| x != id);
        self.waiting.push_front(id);
    }

    fn sort_waiting(&mut self) {
        let (policy, cx) = (self.cfg.policy.get(), self.context());
        let reqs = &self.requests;
        let mut ids: Vec<RequestId> = self.waiting.iter().copied().collect();
        ids.sort_by_cached_key(|id| policy.key(&reqs[id], &cx));
        self.waiting = ids.into();
    }

    /// Records a step's results: `sampled` holds one entry per scheduled entry
    /// with `sample` set, in plan order. Returns the requests that finished.
    pub fn update(&mut self, plan: &StepPlan, sampled: &[Sampled]) -> Vec<(RequestId, FinishReason)> {
        let mut finished = Vec::new();
        let mut next = sampled.iter();
        for s in &plan.scheduled {
            // Aborted (or taken) since `schedule`: skip it, but consume its sampled
            // entry so the entries after it stay aligned with their requests.
            let Some(r) = self.requests.get_mut(&s.id).filter(|r| r.status == Status::Running) else {
                if s.sample {
                    next.next();
                }
                continue;
            };
            r.num_computed = s.start + s.len;
            let tokens = r.tokens();
            let salt = r.cache_salt.clone();
            self.blocks.commit(&mut r.blocks, &tokens, s.start + s.len, salt.as_deref());
            if s.sample {
                let out = next.next().expect("one sampled entry per sampling entry");
                // Children first: they share the blocks before the parent may finish and free them.
                for &(child, tok) in &out.forks {
                    if self.fork(s.id, child).is_ok() {
                        if let Some(f) = self.append_token(child, tok) {
                            finished.push((child, f));
                        }
                    }
                }
                if let Some(f) = self.append_token(s.id, out.token) {
                    finished.push((s.id, f));
                }
            }
        }
        finished
    }

    fn append_token(&mut self, id: RequestId, tok: u32) -> Option<FinishReason> {
        // A request longer than the whole pool could only preempt itself forever.
        let max_len = self.cfg.max_model_len.min(self.blocks.n_blocks() * self.blocks.block_size());
        let r = self.requests.get_mut(&id).expect("exists");
        self.vtc.charge(r.share.tenant.as_ref(), Stage::Decode, 1);
        let finish = if r.stop_ids.contains(&tok) {
            Some(FinishReason::Stop)
        } else {
            r.output.push(tok);
            if r.output.len() >= r.max_tokens || r.num_tokens() >= max_len {
                Some(FinishReason::Length)
            } else {
                None
            }
        };
        if let Some(f) = finish {
            self.finish(id, f);
        }
        finish
    }

    /// Ends a request (stop string, abort, client gone): its blocks return at once.
    pub fn finish(&mut self, id: RequestId, why: FinishReason) {
        let Some(r) = self.requests.get_mut(&id) else { return };
        if matches!(r.status, Status::Finished(_)) {
            return;
        }
        self.blocks.free(&mut r.blocks);
        r.status = Status::Finished(why);
        self.vtc.deactivate(r.share.tenant.as_ref());
        self.running.retain(|&x| x != id);
        self.waiting.retain(|&x| x != id);
    }

    /// Removes a finished request and returns it.
    pub fn take_finished(&mut self, id: RequestId) -> Option<Request> {
        match self.requests.get(&id)?.status {
            Status::Finished(_) => self.requests.remove(&id),
            _ => None,
        }
    }

    /// Starts `child` as a copy of running request `parent` (parallel
    /// sampling): it shares the parent's blocks copy-on-write and its tokens so far.
    fn fork(&mut self, parent: RequestId, child: RequestId) -> Result<(), EngineError> {
        if self.requests.contains_key(&child) {
            return Err(EngineError::InvalidRequest(format!("duplicate request id {}", child.0)));
        }
        let p = self
            .requests
            .get(&parent)
            .ok_or_else(|| EngineError::InvalidRequest(format!("unknown request {}", parent.0)))?;
        let mut c = p.clone();
        c.blocks = self.blocks.fork(&p.blocks);
        self.next_arrival += 1;
        c.id = child;
        c.arrival = self.next_arrival;
        self.vtc.activate(c.share.tenant.as_ref(), c.share.elsewhere);
        self.requests.insert(child, c);
        self.running.push(child);
        Ok(())
    }

    /// Every request's blocks, for invariant checks.
    pub fn holders(&self) -> Vec<&SeqBlocks> {
        self.requests.values().map(|r| &r.blocks).collect()
    }
}
