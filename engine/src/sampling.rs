//! Choosing the next token from a row of logits.
//!
//! Owns the per-request sampling parameters (OpenAI/vLLM semantics), their
//! validation, and [`Sampler`], which applies them in vLLM's order:
//! repetition/frequency/presence penalties, then greedy argmax or
//! temperature → top-k → top-p → min-p → a draw from a seeded PRNG of our own
//! (xoshiro256**), so a fixed seed reproduces a generation exactly.
//! Reported log-probabilities are the log-softmax of the raw logits, before
//! penalties and temperature, as vLLM reports them by default.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

/// Largest `logprobs` a request may ask for (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

/// Temperatures below this are treated as greedy, like vLLM: dividing by a
/// near-zero temperature only amplifies rounding noise.
const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Per-request generation settings.
///
/// Defaults follow vLLM: temperature 1.0 with every filter and penalty off,
/// no seed, and `max_tokens` 16 (the OpenAI completions default; front doors
/// normally set it from the request or the remaining context).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 means off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p`; 1.0 means off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 means off.
    pub min_p: f32,
    /// Multiplicative penalty on every token already in the prompt or output
    /// (positive logits are divided by it, negative ones multiplied); 1.0 means off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI semantics).
    pub frequency_penalty: f32,
    /// PRNG seed; the same seed and inputs give the same tokens. `None` seeds from entropy.
    pub seed: Option<u64>,
    /// Maximum number of tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation; the matched string is not returned.
    pub stop: Vec<String>,
    /// Token ids that end generation (in addition to EOS unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS (benchmarks).
    pub ignore_eos: bool,
    /// Return this many most likely alternatives with each token (at most [`MAX_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// Also score the prompt: the log-probability of every prompt token after the first
    /// given the tokens before it, with this many alternatives (vLLM `prompt_logprobs`).
    /// Such a request computes its whole prompt (no prefix-cache reuse).
    pub prompt_logprobs: Option<usize>,
    /// What the output must match (constrained decoding): each step samples only among the
    /// tokens the guide allows, and EOS only where it accepts.
    pub guide: Option<tandem_text::guide::Guide>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 16,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            guide: None,
        }
    }
}

impl SamplingParams {
    /// Rejects parameters that are meaningless or would make sampling misbehave,
    /// with a message naming the field, so the client can fix its request.
    pub fn validate(&self, vocab_size: usize) -> Result<(), EngineError> {
        let bad = |msg: String| Err(EngineError::InvalidRequest(msg));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!("repetition_penalty must be a finite number > 0, got {}", self.repetition_penalty));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return bad(format!("logprobs must be at most {MAX_LOGPROBS}, got {n}"));
            }
        }
        if let Some(n) = self.prompt_logprobs {
            if n > MAX_LOGPROBS {
                return bad(format!("prompt_logprobs must be at most {MAX_LOGPROBS}, got {n}"));
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop strings must not be empty".into());
        }
        if self.guide.is_some() && self.ignore_eos {
            return bad("ignore_eos cannot be combined with a guide: the output ends where the guide accepts".into());
        }
        if let Some(id) = self.stop_token_ids.iter().find(|&&id| id as usize >= vocab_size) {
            return bad(format!("stop_token_ids contains {id}, outside the vocabulary (size {vocab_size})"));
        }
        Ok(())
    }

    /// Whether these parameters pick the argmax instead of drawing.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    fn has_repetition_penalty(&self) -> bool {
        self.repetition_penalty != 1.0
    }

    fn has_additive_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// The chosen token and its log-probability under the raw logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    /// `log_softmax(raw logits)[id]`.
    pub logprob: f32,
    /// The `logprobs` most likely tokens under the raw logits, most likely
    /// first (ties: lower id first). Empty unless `logprobs` was requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// The log-probability of `id` under the raw `logits` (log-softmax, no penalties or
/// temperature) and the `top` most likely alternatives: how a prompt token is scored.
pub fn token_logprobs(logits: &[f32], id: u32, top: usize) -> SampledToken {
    let lse = log_sum_exp(logits);
    let lp = |i: u32| match logits.get(i as usize) {
        Some(l) if !l.is_nan() => (*l as f64 - lse) as f32,
        _ => f32::NEG_INFINITY,
    };
    let top_logprobs =
        if top > 0 { top_n(logits, top).into_iter().map(|(i, _)| (i, lp(i))).collect() } else { Vec::new() };
    SampledToken { id, logprob: lp(id), top_logprobs }
}

/// Samples tokens for one sequence. Holds the PRNG stream and scratch
/// buffers, so one `Sampler` lives as long as its request.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256,
    /// Logits after penalties (and NaN cleanup).
    work: Vec<f32>,
    /// Tempered weights per id (top-p without top-k).
    weights: Vec<f32>,
    /// Surviving candidates (as [`rank_key`]s) when top-k/top-p need an ordering.
    keys: Vec<u64>,
    /// Per-id marks for repetition penalty; all false between calls.
    seen: Vec<bool>,
    /// Per-id counts of generated tokens; all zero between calls.
    counts: Vec<u32>,
}

impl Sampler {
    /// A sampler for `params` (validated beforehand with [`SamplingParams::validate`]).
    pub fn new(params: &SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(entropy_seed);
        Sampler {
            params: params.clone(),
            rng: Xoshiro256::new(seed),
            work: Vec::new(),
            weights: Vec::new(),
            keys: Vec::new(),
            seen: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// Advances the PRNG as one sampled token would: a decode worker continuing a
    /// sequence whose first token a prefill worker drew keeps the same stream as an
    /// undivided run with the same seed.
    pub fn skip_draw(&mut self) {
        if !self.params.is_greedy() {
            self.rng.next_f64();
        }
    }

    /// Picks the next token from `logits` (one row, vocabulary-sized).
    /// `prompt_ids` feed the repetition penalty, `generated_ids` (this
    /// sequence's output so far) feed all three penalties. Ids outside the row
    /// are ignored; an empty row yields id 0 with log-probability −∞.
    pub fn sample(&mut self, logits: &[f32], prompt_ids: &[u32], generated_ids: &[u32]) -> SampledToken {
        self.sample_masked(logits, prompt_ids, generated_ids, None)
    }

    /// `sample`, among the ids `allowed` allows only (constrained decoding): the others'
    /// logits are −∞ after the penalties, so every mode (greedy, temperature, top-k/p,
    /// min-p) draws within the mask. Log-probabilities stay the model's own.
    pub fn sample_masked(
        &mut self,
        logits: &[f32],
        prompt_ids: &[u32],
        generated_ids: &[u32],
        allowed: Option<&tandem_text::guide::TokenMask>,
    ) -> SampledToken {
        let n = logits.len();
        if n == 0 {
            return SampledToken { id: 0, logprob: f32::NEG_INFINITY, top_logprobs: Vec::new() };
        }
        let lse = log_sum_exp(logits);

        self.work.clear();
        self.work.extend(logits.iter().map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l }));
        self.apply_penalties(prompt_ids, generated_ids);
        if let Some(mask) = allowed {
            for (id, w) in self.work.iter_mut().enumerate() {
                if !mask.allows(id as u32) {
                    *w = f32::NEG_INFINITY;
                }
            }
        }

        let id = if self.params.is_greedy() { argmax(&self.work) } else { self.draw() };

        let raw_lp = |id: u32| {
            let l = logits[id as usize];
            if l.is_nan() {
                f32::NEG_INFINITY
            } else {
                (l as f64 - lse) as f32
            }
        };
        let top_logprobs = match self.params.logprobs {
            Some(k) if k > 0 => top_n(logits, k).into_iter().map(|(i, _)| (i, raw_lp(i))).collect(),
            _ => Vec::new(),
        };
        SampledToken { id, logprob: raw_lp(id), top_logprobs }
    }

    /// Repetition penalty over prompt+output, then frequency/presence over the
    /// output; only the ids that occurred are touched.
    fn apply_penalties(&mut self, prompt_ids: &[u32], generated_ids: &[u32]) {
        let n = self.work.len();
        if self.params.has_repetition_penalty() {
            let p = self.params.repetition_penalty;
            if self.seen.len() < n {
                self.seen.resize(n, false);
            }
            for &id in prompt_ids.iter().chain(generated_ids) {
                let i = id as usize;
                if i < n && !self.seen[i] {
                    self.seen[i] = true;
                    let l = &mut self.work[i];
                    *l = if *l > 0.0 { *l / p } else { *l * p };
                }
            }
            for &id in prompt_ids.iter().chain(generated_ids) {
                if let Some(s) = self.seen.get_mut(id as usize) {
                    *s = false;
                }
            }
        }
        if self.params.has_additive_penalties() {
            let (freq, pres) = (self.params.frequency_penalty, self.params.presence_penalty);
            if self.counts.len() < n {
                self.counts.resize(n, 0);
            }
            for &id in generated_ids {
                if let Some(c) = self.counts.get_mut(id as usize).filter(|_| (id as usize) < n) {
                    *c += 1;
                }
            }
            for &id in generated_ids {
                let i = id as usize;
                if i < n && self.counts[i] > 0 {
                    self.work[i] -= freq * self.counts[i] as f32 + pres;
                    self.counts[i] = 0;
                }
            }
        }
    }

    /// Temperature, top-k, top-p, min-p, then a draw, over `self.work`.
    fn draw(&mut self) -> u32 {
        let n = self.work.len();
        let max = max_value(&self.work);
        if !max.is_finite() {
            // Nothing finite to normalise against (all masked, or +∞ logits): take the argmax.
            return argmax(&self.work);
        }
        let inv_t = 1.0 / self.params.temperature;
        // min-p keeps p >= min_p * p_max, i.e. (logit - max) / T >= ln(min_p).
        let floor = if self.params.min_p > 0.0 { self.params.min_p.ln() } else { f32::NEG_INFINITY };
        let top_k = self.params.top_k;
        let use_top_k = top_k > 0 && top_k < n;
        let use_top_p = self.params.top_p < 1.0;

        if !use_top_k && !use_top_p {
            // Full distribution: tempered weights (min-p folded in) in place,
            // one vectorised pass, then a draw; no ordering needed.
            for l in self.work.iter_mut() {
                let s = (*l - max) * inv_t;
                *l = if s >= floor { exp_fast(s) } else { 0.0 };
            }
            let target = self.rng.next_f64() * sum_f64(&self.work);
            return pick(self.work.iter().enumerate().map(|(i, &w)| (i as u32, w)), target).unwrap_or(0);
        }

        // Only the few surviving candidates need their weights.
        let work = &self.work;
        let weight = |key: u64| exp_fast((work[key_id(key) as usize] - max) * inv_t);
        if use_top_k {
            top_keys(work, top_k, &mut self.keys);
            if use_top_p {
                let total: f64 = self.keys.iter().map(|&k| weight(k) as f64).sum();
                let keep = nucleus_len(&mut self.keys, self.params.top_p as f64 * total, weight);
                self.keys.truncate(keep);
            }
        } else {
            // top-p alone. The nucleus is usually small: try growing heads
            // before ordering the whole row.
            self.weights.clear();
            self.weights.resize(work.len(), 0.0);
            for (w, &l) in self.weights.iter_mut().zip(work) {
                *w = exp_fast((l - max) * inv_t);
            }
            let weights = &self.weights;
            let weight = |key: u64| weights[key_id(key) as usize];
            let budget = self.params.top_p as f64 * sum_f64(weights);
            let mut found = None;
            for head in [NUCLEUS_HEAD, 16 * NUCLEUS_HEAD] {
                top_keys(work, head, &mut self.keys);
                self.keys.sort_unstable_by(|a, b| b.cmp(a));
                if let Ok(keep) = nucleus_cut(&self.keys, budget, 0.0, weight) {
                    found = Some(keep.max(1));
                    break;
                }
                if self.keys.len() < head {
                    // The head already holds every candidate.
                    found = Some(self.keys.len());
                    break;
                }
            }
            let keep = match found {
                Some(keep) => keep,
                None => {
                    self.keys.clear();
                    self.keys.extend(
                        work.iter()
                            .enumerate()
                            .filter(|(_, l)| **l > f32::NEG_INFINITY)
                            .map(|(i, &l)| rank_key(l, i as u32)),
                    );
                    nucleus_len(&mut self.keys, budget, weight)
                }
            };
            self.keys.truncate(keep);
        }
        // The most likely token survives top-k and top-p, so min-p stays relative to it.
        let kept = |key: u64| {
            let s = (work[key_id(key) as usize] - max) * inv_t;
            (key_id(key), if s >= floor { exp_fast(s) } else { 0.0 })
        };
        let total: f64 = self.keys.iter().map(|&k| kept(k).1 as f64).sum();
        let target = self.rng.next_f64() * total;
        pick(self.keys.iter().map(|&k| kept(k)), target).or(self.keys.first().map(|&k| key_id(k))).unwrap_or(0)
    }
}

/// A u64 whose order is the candidate order: larger logit first, then lower
/// id. Integer keys make selection much faster than comparing floats.
fn rank_key(logit: f32, id: u32) -> u64 {
    let b = logit.to_bits();
    // Monotone map of f32 (total order) onto u32.
    let ordered = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    ((ordered as u64) << 32) | (!id) as u64
}

fn key_id(key: u64) -> u32 {
    !(key as u32)
}

/// Candidates examined before top-p falls back to a selection over the whole row.
const NUCLEUS_HEAD: usize = 64;

/// The (at most) `k` best [`rank_key`]s of the finite entries of `row`, in no
/// particular order. One pass; a buffer of 2k is trimmed back to k by
/// selection whenever it fills, and later entries must beat its k-th key.
fn top_keys(row: &[f32], k: usize, keys: &mut Vec<u64>) {
    keys.clear();
    if k == 0 {
        return;
    }
    let cap = 2 * k.max(32);
    let mut threshold = 0u64;
    for (i, &l) in row.iter().enumerate() {
        if l > f32::NEG_INFINITY {
            let key = rank_key(l, i as u32);
            if key > threshold {
                keys.push(key);
                if keys.len() == cap {
                    keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
                    keys.truncate(k);
                    threshold = keys[k - 1];
                }
            }
        }
    }
    if keys.len() > k {
        keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        keys.truncate(k);
    }
}

/// Walks keys sorted best-first, continuing from mass `acc` at position
/// `lo`: `Ok(count kept)` once the mass before a key reaches `budget`,
/// `Err(acc)` if the keys run out first.
fn nucleus_cut(sorted: &[u64], budget: f64, mut acc: f64, weight: impl Fn(u64) -> f32) -> Result<usize, f64> {
    for (i, &k) in sorted.iter().enumerate() {
        if acc >= budget {
            return Ok(i);
        }
        acc += weight(k) as f64;
    }
    Err(acc)
}

/// How many of the most likely candidates top-p keeps: token i (in
/// descending order) stays while the mass before it is below `budget`; at
/// least one stays. Reorders `keys` so that they come first.
///
/// Expected O(n): the head (usually the whole nucleus) is found with one
/// selection; a wide nucleus is narrowed by halving selections.
fn nucleus_len(keys: &mut [u64], budget: f64, weight: impl Fn(u64) -> f32 + Copy) -> usize {
    let n = keys.len();
    if n == 0 {
        return 0;
    }
    let desc = |a: &u64, b: &u64| b.cmp(a);
    let m = NUCLEUS_HEAD.min(n);
    if m < n {
        keys.select_nth_unstable_by(m - 1, desc);
    }
    keys[..m].sort_unstable_by(desc);
    let mut acc = match nucleus_cut(&keys[..m], budget, 0.0, weight) {
        Ok(k) => return k.max(1),
        Err(acc) => acc,
    };
    let (mut lo, mut hi) = (m, n);
    while hi - lo > NUCLEUS_HEAD {
        let mid = lo + (hi - lo) / 2;
        keys[lo..hi].select_nth_unstable_by(mid - lo, desc);
        let upper: f64 = keys[lo..=mid].iter().map(|&k| weight(k) as f64).sum();
        if acc + upper >= budget {
            hi = mid + 1;
        } else {
            acc += upper;
            lo = mid + 1;
        }
    }
    keys[lo..hi].sort_unstable_by(desc);
    match nucleus_cut(&keys[lo..hi], budget, acc, weight) {
        Ok(k) => lo + k,
        Err(_) => hi,
    }
}

/// The first (id, weight) at which the running weight exceeds `target`;
/// the last positive one if rounding leaves `target` out of reach.
fn pick(items: impl Iterator<Item = (u32, f32)>, target: f64) -> Option<u32> {
    let mut acc = 0.0f64;
    let mut last = None;
    for (id, w) in items {
        if w > 0.0 {
            acc += w as f64;
            last = Some(id);
            if acc > target {
                return last;
            }
        }
    }
    last
}

const LANES: usize = 8;

/// Largest value, ignoring NaN (−∞ for an empty or all-NaN row). Written in
/// lanes so it vectorises.
fn max_value(v: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            if c[j] > m[j] {
                m[j] = c[j];
            }
        }
    }
    let mut best = f32::NEG_INFINITY;
    for &x in m.iter().chain(rest) {
        if x > best {
            best = x;
        }
    }
    best
}

/// Σ v in f64, in lanes so it vectorises.
fn sum_f64(v: &[f32]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += c[j] as f64;
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|&x| x as f64).sum::<f64>()
}

/// `exp(x)` for x ≤ ~88 to within a few ulp, branch-free so loops over a
/// vocabulary vectorise (std's `exp` is a libm call per element). Range
/// reduction x = n·ln2 + r, |r| ≤ ln2/2, then a degree-6 polynomial for e^r.
#[inline]
fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MIN_X: f32 = -87.33;
    // 1.5 * 2^23: adding it rounds to an integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(MIN_X, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p =
        ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^n from n's bits: (n + 127) << 23.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < MIN_X {
        0.0
    } else {
        e_r * scale
    }
}

/// Index of the largest value, lowest index on ties; NaN never wins.
fn argmax(v: &[f32]) -> u32 {
    let max = max_value(v);
    v.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// The `k` largest entries as (id, logit), largest first, lower id first
/// among equals, in one pass (k is small). NaN entries are never chosen.
fn top_n(v: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(v.len());
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &x) in v.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if top.len() == k {
            match top.last() {
                Some(&(_, worst)) if x > worst => {}
                _ => continue,
            }
        }
        let pos = top.partition_point(|&(_, y)| y >= x);
        top.insert(pos, (i as u32, x));
        top.truncate(k);
    }
    top
}

/// `Σ exp((v - max) · inv_t)`; NaN entries count as −∞. Block-wise fill
/// then sum, the shape the compiler vectorises.
fn sum_exp(v: &[f32], max: f32, inv_t: f32) -> f64 {
    let mut buf = [0.0f32; 1024];
    let mut total = 0.0f64;
    for block in v.chunks(buf.len()) {
        let out = &mut buf[..block.len()];
        for (e, &x) in out.iter_mut().zip(block) {
            *e = if x.is_nan() { 0.0 } else { exp_fast((x - max) * inv_t) };
        }
        total += sum_f64(out);
    }
    total
}

/// `ln Σ exp(v)`; NaN entries count as −∞.
fn log_sum_exp(v: &[f32]) -> f64 {
    let max = max_value(v);
    if max.is_infinite() {
        return max as f64;
    }
    max as f64 + sum_exp(v, max, 1.0).ln()
}

/// A seed for requests without one: wall-clock time, a process-wide counter
/// and std's per-process random hasher keys, mixed.
fn entropy_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    h.write_u64(nanos);
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64.
#[derive(Debug, Clone)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut splitmix = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Xoshiro256 { s: [splitmix(), splitmix(), splitmix(), splitmix()] }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests;
