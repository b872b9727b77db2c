//! The engine loop: many requests through one model with continuous batching.
//!
//! `step()` is three calls: the scheduler's `schedule()`, the model's
//! `forward()` over the plan's flat batch, and `postprocess` (sampling, the
//! scheduler's `update()`, detokenization and stop strings). The loop owns
//! the per-request state the scheduler does not need: samplers, incremental
//! decoders, stop matchers, logprobs. It is synchronous; an async worker wraps
//! it as an actor.

use std::collections::HashMap;

use crate::block_manager::{BlockManager, KvEvent};
use crate::error::EngineError;
use crate::kv_cache::{BlockId, KvCache, KvDtype};
use crate::model::{ForwardBatch, LayerKvBytes, LogitsWanted, Model, Scratch};
use crate::sampling::{SampledToken, Sampler, SamplingParams};
use crate::scheduler::{Finish, NewRequest, RequestId, Sampled, Scheduler, SchedulerConfig, SchedulerStats};
use crate::stop::StopMatcher;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// Settings of the engine loop.
#[derive(Debug, Clone)]
pub struct LlmEngineConfig {
    pub scheduler: SchedulerConfig,
    pub block_size: usize,
    /// KV blocks in the pool.
    pub kv_blocks: usize,
    pub kv_dtype: KvDtype,
    pub prefix_caching: bool,
}

impl Default for LlmEngineConfig {
    fn default() -> Self {
        LlmEngineConfig {
            scheduler: SchedulerConfig::default(),
            block_size: 16,
            kv_blocks: 2048,
            kv_dtype: KvDtype::F16,
            prefix_caching: true,
        }
    }
}

/// A request as the engine takes it.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Parallel samples; they share the prompt's blocks copy-on-write.
    pub n: usize,
    pub priority: i32,
    pub cache_salt: Option<String>,
    /// Hand the prompt's KV blocks to `step_exporting`'s hook as the steps compute them
    /// (a prefill worker ships them to a decode worker).
    pub export_kv: bool,
}

impl EngineRequest {
    /// A request for `prompt` with `params`, one choice, default priority, no salt.
    pub fn new(prompt: Vec<u32>, params: SamplingParams) -> Self {
        EngineRequest { prompt, params, n: 1, priority: 0, cache_salt: None, export_kv: false }
    }
}

/// The blocks of one exporting request that a step completes: `blocks` are entries
/// `first..first + blocks.len()` of its block table, in order. A block is handed over
/// once it is full, or at the end of the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvExport {
    pub id: RequestId,
    pub first: usize,
    pub blocks: Vec<BlockId>,
}

/// Why a sequence ended, as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// News of one sequence from one step.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqOutput {
    pub id: RequestId,
    /// The request this sequence belongs to (its first sequence's id).
    pub group: RequestId,
    /// Choice index within the request (0..n).
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<SampledToken>,
    pub finish: Option<FinishReason>,
    /// Prompt tokens served from the prefix cache (set on the first output).
    pub cached_tokens: usize,
    /// With `prompt_logprobs`: the score of every prompt token after the first, in order
    /// (set on the first output).
    pub prompt_logprobs: Vec<SampledToken>,
}

struct SeqState {
    group: RequestId,
    index: usize,
    params: SamplingParams,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    /// Output tokens already turned into text.
    emitted: usize,
    /// Ids reserved for parallel samples, forked after the prompt's first sample.
    pending_forks: Vec<RequestId>,
    started: bool,
    /// Logprobs of tokens sampled since the last output.
    logprobs_pending: Vec<SampledToken>,
    /// Exporting requests: block-table entries already handed to the hook.
    exported: Option<usize>,
    /// Prompt scoring: the last prompt position scored, and scores not yet output.
    prompt_scored: usize,
    prompt_lp_pending: Vec<SampledToken>,
}

pub struct LlmEngine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub scheduler: Scheduler,
    kv: KvCache,
    scratch: Scratch,
    seqs: HashMap<RequestId, SeqState>,
    next_id: u64,
}

impl std::fmt::Debug for LlmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmEngine").field("sequences", &self.seqs.len()).finish()
    }
}

impl LlmEngine {
    pub fn new(model: Model, tokenizer: Tokenizer, cfg: LlmEngineConfig) -> Result<Self, EngineError> {
        let kv = KvCache::new(model.kv_shape(cfg.block_size), model.config.n_layers, cfg.kv_blocks, cfg.kv_dtype)?;
        Self::with_cache(model, tokenizer, cfg, kv)
    }

    /// An engine over a cache the caller made (e.g. `KvCache::from_raw` over the shared
    /// segment a KV receiver writes into); its shape must match `cfg` and the model.
    pub fn with_cache(
        model: Model,
        tokenizer: Tokenizer,
        cfg: LlmEngineConfig,
        kv: KvCache,
    ) -> Result<Self, EngineError> {
        if kv.shape != model.kv_shape(cfg.block_size) || kv.n_blocks != cfg.kv_blocks || kv.dtype != cfg.kv_dtype {
            return Err(EngineError::InvalidRequest("the KV cache does not match the engine's settings".into()));
        }
        let mut sc = cfg.scheduler.clone();
        sc.max_model_len = sc.max_model_len.min(model.config.context_length);
        sc.max_prompt_len = sc.max_prompt_len.min(sc.max_model_len - 1);
        let blocks = BlockManager::new(cfg.kv_blocks, cfg.block_size, cfg.prefix_caching);
        Ok(LlmEngine {
            model,
            tokenizer,
            scheduler: Scheduler::new(sc, blocks),
            kv,
            scratch: Scratch::default(),
            seqs: HashMap::new(),
            next_id: 1,
        })
    }

    fn check(&self, req: &EngineRequest) -> Result<(), EngineError> {
        let vocab = self.model.config.vocab_size;
        req.params.validate(vocab)?;
        if req.n == 0 || req.n > 64 {
            return Err(EngineError::InvalidRequest(format!("n must be in 1..=64, got {}", req.n)));
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!("token id {t} is outside the vocabulary")));
        }
        Ok(())
    }

    fn new_request(&self, id: RequestId, req: &EngineRequest) -> NewRequest {
        let mut stop_ids = req.params.stop_token_ids.clone();
        if !req.params.ignore_eos {
            stop_ids.extend(self.tokenizer.eos_id());
        }
        NewRequest {
            id,
            prompt: req.prompt.clone(),
            max_tokens: req.params.max_tokens,
            stop_ids,
            priority: req.priority,
            cache_salt: req.cache_salt.clone(),
        }
    }

    /// Queues a request; returns the id of its first sequence (its group id).
    pub fn add_request(&mut self, req: EngineRequest) -> Result<RequestId, EngineError> {
        self.check(&req)?;
        let id = RequestId(self.next_id);
        self.scheduler.add(self.new_request(id, &req))?;
        self.next_id += req.n as u64;
        let forks = (1..req.n as u64).map(|i| RequestId(id.0 + i)).collect();
        let mut seq = new_seq(id, 0, &req.params, forks);
        seq.exported = req.export_kv.then_some(0);
        self.seqs.insert(id, seq);
        if req.params.prompt_logprobs.is_some() {
            self.scheduler.skip_prefix_cache(id);
        }
        Ok(id)
    }

    /// Admits a request whose prompt KV another worker computes: blocks for the whole
    /// prompt are reserved now (the returned table, in order) and the request waits
    /// until `remote_kv_ready`. One choice only (`n` = 1).
    pub fn add_remote_request(&mut self, req: EngineRequest) -> Result<(RequestId, Vec<BlockId>), EngineError> {
        self.check(&req)?;
        if req.n != 1 {
            return Err(EngineError::InvalidRequest(format!("a remote-KV request has one choice, got n = {}", req.n)));
        }
        let id = RequestId(self.next_id);
        let table = self.scheduler.add_remote(self.new_request(id, &req))?;
        self.next_id += 1;
        let mut seq = new_seq(id, 0, &req.params, Vec::new());
        // The prefill worker drew the first token: keep the seeded stream where an
        // undivided run would have it.
        seq.sampler.skip_draw();
        self.seqs.insert(id, seq);
        Ok((id, table))
    }

    /// The prompt's KV of `id` is in its blocks and the prefill worker sampled
    /// `first_token`: the request joins the running batch. Returns the first token's
    /// output (text, and a finish if that token ended the request).
    pub fn remote_kv_ready(&mut self, id: RequestId, first_token: u32) -> Result<SeqOutput, EngineError> {
        if first_token as usize >= self.model.config.vocab_size {
            self.abort(id);
            return Err(EngineError::InvalidRequest(format!("first token {first_token} is outside the vocabulary")));
        }
        let finished = self.scheduler.remote_kv_ready(id, first_token)?;
        self.postprocess(id, finished)?.ok_or_else(|| EngineError::InvalidRequest(format!("request {} vanished", id.0)))
    }

    /// Ends a request and all its parallel samples now; their blocks return at once.
    pub fn abort(&mut self, group: RequestId) {
        let ids: Vec<RequestId> = self.seqs.iter().filter(|(_, s)| s.group == group).map(|(&id, _)| id).collect();
        for id in ids {
            self.scheduler.finish(id, Finish::Aborted);
            self.scheduler.take_finished(id);
            self.seqs.remove(&id);
        }
    }

    /// Whether any sequence of request `group` is still unfinished.
    pub fn has_group(&self, group: RequestId) -> bool {
        self.seqs.values().any(|s| s.group == group)
    }

    pub fn has_unfinished(&self) -> bool {
        self.scheduler.has_unfinished()
    }

    pub fn stats(&self) -> SchedulerStats {
        self.scheduler.stats()
    }

    /// Prefix-cache changes since the last call, for the router's global index.
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.scheduler.blocks.take_events()
    }

    /// Runs one step; returns what each touched sequence produced.
    pub fn step(&mut self) -> Result<Vec<SeqOutput>, EngineError> {
        self.step_exporting(&mut |_, _, _| {})
    }

    /// `step`, calling `on_layer(exports, layer, kv)` as soon as each layer's K and V are
    /// in the cache when the step computes blocks of exporting requests (`export_kv`).
    /// `exports` is the same for every layer of the step.
    pub fn step_exporting(
        &mut self,
        on_layer: &mut dyn FnMut(&[KvExport], usize, LayerKvBytes<'_>),
    ) -> Result<Vec<SeqOutput>, EngineError> {
        let plan = self.scheduler.schedule();
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let bs = self.kv.shape.block_size;
        let mut exports = Vec::new();
        for s in &plan.scheduled {
            let Some(st) = self.seqs.get_mut(&s.id) else { continue };
            let Some(done) = st.exported else { continue };
            let r = self.scheduler.get(s.id).expect("scheduled request exists");
            let end = s.start + s.len;
            let upto = if end >= r.prompt.len() { r.prompt.len().div_ceil(bs) } else { end / bs };
            if upto > done {
                exports.push(KvExport { id: s.id, first: done, blocks: r.blocks.table[done..upto].to_vec() });
                st.exported = Some(upto);
            }
        }
        for &(from, to) in &plan.copies {
            self.kv.copy_block(from, to);
        }
        let vocab = self.model.config.vocab_size;
        let token_lists: Vec<Vec<u32>> = plan
            .scheduled
            .iter()
            .map(|s| {
                let r = self.scheduler.get(s.id).expect("scheduled request exists");
                (s.start..s.start + s.len).map(|i| r.token(i)).collect()
            })
            .collect();
        // Logits rows: every position of a chunk whose prompt is being scored, else the
        // last position of a chunk that samples. `rows[i]` is entry i's first row and count.
        let mut rows = Vec::with_capacity(plan.scheduled.len());
        let mut next_row = 0;
        let logits = {
            let mut batch = ForwardBatch::default();
            for (s, toks) in plan.scheduled.iter().zip(&token_lists) {
                let r = self.scheduler.get(s.id).expect("exists");
                let scoring = self.seqs.get(&s.id).is_some_and(|st| st.params.prompt_logprobs.is_some())
                    && s.start + 1 < r.prompt.len();
                let table = &r.blocks.table;
                let seq = batch.add_seq(table);
                let (want, n) = match (scoring, s.sample) {
                    (true, _) => (LogitsWanted::All, s.len),
                    (false, true) => (LogitsWanted::Last, 1),
                    (false, false) => (LogitsWanted::None, 0),
                };
                rows.push((next_row, n));
                next_row += n;
                batch.add_tokens(seq, toks, s.start, want);
            }
            if exports.is_empty() {
                self.model.forward(&batch, &mut self.kv, &mut self.scratch)?.to_vec()
            } else {
                let hook = &mut |layer: usize, kv: LayerKvBytes<'_>| on_layer(&exports, layer, kv);
                self.model.forward_with_hook(&batch, &mut self.kv, &mut self.scratch, hook)?.to_vec()
            }
        };

        // Prompt scoring: the logits at position p give prompt token p + 1's log-probability.
        for (s, &(first, n)) in plan.scheduled.iter().zip(&rows) {
            if n == 0 {
                continue;
            }
            let Some(st) = self.seqs.get_mut(&s.id) else { continue };
            let Some(top) = st.params.prompt_logprobs else { continue };
            let prompt = &self.scheduler.get(s.id).expect("exists").prompt;
            // A scored chunk has a row per position; any other has at most the last one,
            // which lies past the prompt's end, where nothing is scored.
            for j in 0..n {
                let target = s.start + j + 1;
                if target < prompt.len() && target > st.prompt_scored {
                    let row = &logits[(first + j) * vocab..(first + j + 1) * vocab];
                    st.prompt_lp_pending.push(crate::sampling::token_logprobs(row, prompt[target], top));
                    st.prompt_scored = target;
                }
            }
        }

        // Sample, in plan order.
        let mut sampled = Vec::new();
        for (s, &(first, n)) in plan.scheduled.iter().zip(&rows) {
            if !s.sample {
                continue;
            }
            let r = self.scheduler.get(s.id).expect("exists");
            let (prompt, output) = (r.prompt.clone(), r.output.clone());
            let st = self.seqs.get_mut(&s.id).expect("engine state for every sequence");
            let row = first + n - 1;
            let l = &logits[row * vocab..(row + 1) * vocab];
            let tok = st.sampler.sample(l, &prompt, &output);
            let mut forks = Vec::new();
            if !st.pending_forks.is_empty() {
                let (group, params) = (st.group, st.params.clone());
                for (i, child) in std::mem::take(&mut st.pending_forks).into_iter().enumerate() {
                    let mut p = params.clone();
                    p.seed = params.seed.map(|x| x.wrapping_add(i as u64 + 1));
                    let mut cs = new_seq(group, i + 1, &p, Vec::new());
                    let ct = cs.sampler.sample(l, &prompt, &output);
                    record_logprob(&mut cs, &ct);
                    forks.push((child, ct.id));
                    self.seqs.insert(child, cs);
                }
            }
            let st = self.seqs.get_mut(&s.id).expect("exists");
            record_logprob(st, &tok);
            sampled.push((s.id, Sampled { token: tok.id, forks }));
        }
        let sampled_only: Vec<Sampled> = sampled.iter().map(|(_, s)| s.clone()).collect();
        let finished: HashMap<RequestId, Finish> = self.scheduler.update(&plan, &sampled_only).into_iter().collect();

        // Text, stop strings, finish reasons.
        let mut outputs = Vec::new();
        for (id, smp) in &sampled {
            for sid in std::iter::once(*id).chain(smp.forks.iter().map(|f| f.0)) {
                if let Some(out) = self.postprocess(sid, finished.get(&sid).copied())? {
                    outputs.push(out);
                }
            }
        }
        Ok(outputs)
    }

    fn postprocess(&mut self, id: RequestId, finished: Option<Finish>) -> Result<Option<SeqOutput>, EngineError> {
        let Some(r) = self.scheduler.get(id) else { return Ok(None) };
        let new_tokens: Vec<u32> = {
            let st = &self.seqs[&id];
            r.output[st.emitted..].to_vec()
        };
        let cached_tokens = r.cached_tokens;
        let st = self.seqs.get_mut(&id).expect("exists");
        let mut text = String::new();
        let mut finish = finished.map(|f| match f {
            Finish::Stop => FinishReason::Stop,
            Finish::Length => FinishReason::Length,
            Finish::Aborted => FinishReason::Abort,
        });
        let mut kept = 0;
        for &t in &new_tokens {
            let delta = st.decoder.push(&self.tokenizer, t)?;
            let out = st.stops.push(&delta);
            text.push_str(&out.text);
            kept += 1;
            if out.is_stop() {
                finish = Some(FinishReason::Stop);
                break;
            }
        }
        st.emitted += new_tokens.len();
        if finish.is_some() && !st.stops.is_stopped() {
            let tail = st.decoder.finish();
            let out = st.stops.push(&tail);
            text.push_str(&out.text);
            if !st.stops.is_stopped() {
                text.push_str(&st.stops.finish());
            }
        }
        let first = !st.started;
        st.started = true;
        let logprobs = std::mem::take(&mut st.logprobs_pending);
        let prompt_logprobs = if first { std::mem::take(&mut st.prompt_lp_pending) } else { Vec::new() };
        let out = SeqOutput {
            id,
            group: st.group,
            index: st.index,
            text,
            token_ids: new_tokens[..kept].to_vec(),
            logprobs,
            finish,
            cached_tokens: if first { cached_tokens } else { 0 },
            prompt_logprobs,
        };
        if finish.is_some() {
            if finished.is_none() {
                self.scheduler.finish(id, Finish::Stop);
            }
            self.scheduler.take_finished(id);
            self.seqs.remove(&id);
        }
        Ok(Some(out))
    }
}

fn new_seq(group: RequestId, index: usize, params: &SamplingParams, pending_forks: Vec<RequestId>) -> SeqState {
    SeqState {
        group,
        index,
        params: params.clone(),
        sampler: Sampler::new(params),
        decoder: IncrementalDecoder::new(true),
        stops: StopMatcher::new(&params.stop),
        emitted: 0,
        pending_forks,
        started: false,
        logprobs_pending: Vec::new(),
        exported: None,
        prompt_scored: 0,
        prompt_lp_pending: Vec::new(),
    }
}

fn record_logprob(st: &mut SeqState, t: &SampledToken) {
    if st.params.logprobs.is_some() {
        st.logprobs_pending.push(t.clone());
    }
}
