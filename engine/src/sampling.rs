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
        if self.stop.iter().any(String::is_empty) {
            return bad("stop strings must not be empty".into());
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

    /// Picks the next token from `logits` (one row, vocabulary-sized).
    /// `prompt_ids` feed the repetition penalty, `generated_ids` (this
    /// sequence's output so far) feed all three penalties. Ids outside the row
    /// are ignored; an empty row yields id 0 with log-probability −∞.
    pub fn sample(&mut self, logits: &[f32], prompt_ids: &[u32], generated_ids: &[u32]) -> SampledToken {
        let n = logits.len();
        if n == 0 {
            return SampledToken { id: 0, logprob: f32::NEG_INFINITY, top_logprobs: Vec::new() };
        }
        let lse = log_sum_exp(logits);

        self.work.clear();
        self.work.extend(logits.iter().map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l }));
        self.apply_penalties(prompt_ids, generated_ids);

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
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    /// A pseudo-random logits row of vocabulary size.
    fn row(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Xoshiro256::new(seed);
        (0..n).map(|_| (r.next_f64() * 20.0 - 10.0) as f32).collect()
    }

    /// Empirical frequencies of `draws` samples.
    fn histogram(p: &SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut s = Sampler::new(p);
        let mut h = vec![0; logits.len()];
        for _ in 0..draws {
            h[s.sample(logits, &[], &[]).id as usize] += 1;
        }
        h
    }

    #[test]
    fn xoshiro_reference_values() {
        // Reference outputs of xoshiro256** for state {1, 2, 3, 4}.
        let mut r = Xoshiro256 { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(got, vec![11520, 0, 1509978240]);
        let mut a = Xoshiro256::new(7);
        let mut b = Xoshiro256::new(7);
        for _ in 0..100 {
            let x = a.next_f64();
            assert!((0.0..1.0).contains(&x));
            assert_eq!(x, b.next_f64());
        }
    }

    #[test]
    fn greedy_takes_argmax_lowest_id_on_ties() {
        let mut s = Sampler::new(&params(|p| p.temperature = 0.0));
        assert_eq!(s.sample(&[0.5, 2.0, -1.0, 2.0], &[], &[]).id, 1);
        assert_eq!(s.sample(&[f32::NAN, -3.0, -2.0], &[], &[]).id, 2);
        let big = row(49152, 3);
        let want = big.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
        assert_eq!(s.sample(&big, &[], &[]).id as usize, want);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits = row(49152, 11);
        let greedy = Sampler::new(&params(|p| p.temperature = 0.0)).sample(&logits, &[], &[]).id;
        let mut s = Sampler::new(&params(|p| {
            p.top_k = 1;
            p.temperature = 1.5;
            p.seed = Some(1);
        }));
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[], &[]).id, greedy);
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let logits = row(49152, 5);
        let p = params(|p| {
            p.temperature = 1.0;
            p.seed = Some(42);
        });
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&logits, &[], &[]).id).collect::<Vec<_>>()
        };
        let a = run(&p);
        assert_eq!(a, run(&p));
        assert_ne!(a, run(&params(|q| q.seed = Some(43))));
        for variant in [
            params(|q| {
                q.seed = Some(9);
                q.top_k = 50
            }),
            params(|q| {
                q.seed = Some(9);
                q.top_p = 0.9
            }),
            params(|q| {
                q.seed = Some(9);
                q.min_p = 0.05
            }),
        ] {
            assert_eq!(run(&variant), run(&variant));
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax(ln [0.1, 0.2, 0.3, 0.4]).
        let logits: Vec<f32> = [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect();
        let draws = 40_000;
        let h = histogram(&params(|p| p.seed = Some(3)), &logits, draws);
        for (i, &c) in h.iter().enumerate() {
            let f = c as f64 / draws as f64;
            assert!((f - 0.1 * (i + 1) as f64).abs() < 0.01, "token {i}: {f}");
        }
        // Temperature 0.5 squares the probabilities: [1, 4, 9, 16] / 30.
        let h = histogram(
            &params(|p| {
                p.seed = Some(4);
                p.temperature = 0.5
            }),
            &logits,
            draws,
        );
        for (i, &c) in h.iter().enumerate() {
            let want = ((i + 1) * (i + 1)) as f64 / 30.0;
            assert!((c as f64 / draws as f64 - want).abs() < 0.01, "token {i}");
        }
    }

    #[test]
    fn top_k_top_p_min_p_filter() {
        let logits: Vec<f32> = [0.05f32, 0.1, 0.15, 0.3, 0.4].iter().map(|p| p.ln()).collect();
        let seen = |p: SamplingParams| -> Vec<usize> {
            let h = histogram(&p, &logits, 5_000);
            (0..h.len()).filter(|&i| h[i] > 0).collect()
        };
        assert_eq!(
            seen(params(|p| {
                p.seed = Some(1);
                p.top_k = 2
            })),
            vec![3, 4]
        );
        // Mass before token 3 is 0.4 < 0.5 → kept; before token 2 is 0.7 → dropped.
        assert_eq!(
            seen(params(|p| {
                p.seed = Some(1);
                p.top_p = 0.5
            })),
            vec![3, 4]
        );
        assert_eq!(
            seen(params(|p| {
                p.seed = Some(1);
                p.top_p = 0.75
            })),
            vec![2, 3, 4]
        );
        assert_eq!(
            seen(params(|p| {
                p.seed = Some(1);
                p.top_p = 0.01
            })),
            vec![4]
        );
        // min_p 0.3 keeps p >= 0.12.
        assert_eq!(
            seen(params(|p| {
                p.seed = Some(1);
                p.min_p = 0.3
            })),
            vec![2, 3, 4]
        );
        // min_p after top_k: relative to the max, so top_k=4 and min_p=0.3 → {2, 3, 4}.
        assert_eq!(
            seen(params(|p| {
                p.seed = Some(1);
                p.top_k = 4;
                p.min_p = 0.3
            })),
            vec![2, 3, 4]
        );
        assert_eq!(
            seen(params(|p| {
                p.seed = Some(1);
                p.min_p = 1.0
            })),
            vec![4]
        );
    }

    #[test]
    fn top_p_on_a_large_vocab_matches_a_full_sort() {
        let logits = row(49152, 21);
        let top_p = 0.3f32;
        // Reference nucleus with a full sort.
        let mut order: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let max = order[0].1;
        let w: Vec<f64> = order.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        let mut nucleus = std::collections::HashSet::new();
        for (i, &(id, _)) in order.iter().enumerate() {
            if acc >= top_p as f64 * total {
                break;
            }
            acc += w[i];
            nucleus.insert(id);
        }
        assert!(nucleus.len() > 64, "test should need more than one doubling step");
        let mut s = Sampler::new(&params(|p| {
            p.seed = Some(8);
            p.top_p = top_p
        }));
        for _ in 0..2000 {
            assert!(nucleus.contains(&s.sample(&logits, &[], &[]).id));
        }
    }

    #[test]
    fn rank_keys_order_like_logits() {
        let vals = [f32::NEG_INFINITY, -3.5, -0.0, 0.0, 1e-30, 2.0, 2.0, f32::INFINITY];
        for (i, &a) in vals.iter().enumerate() {
            for (j, &b) in vals.iter().enumerate() {
                let want = a.total_cmp(&b).then((j as u32).cmp(&(i as u32)));
                assert_eq!(rank_key(a, i as u32).cmp(&rank_key(b, j as u32)), want, "{a} {b}");
            }
            assert_eq!(key_id(rank_key(a, i as u32)), i as u32);
        }
    }

    #[test]
    fn top_keys_matches_a_full_sort() {
        let mut logits = row(5000, 12);
        logits[7] = f32::NEG_INFINITY;
        logits[9] = logits[10];
        let mut all: Vec<u64> =
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| rank_key(l, i as u32)).collect();
        all.sort_by(|a, b| b.cmp(a));
        let mut keys = Vec::new();
        for k in [1, 2, 31, 64, 65, 1000, 4998, 4999, 5000, 6000] {
            top_keys(&logits, k, &mut keys);
            keys.sort_by(|a, b| b.cmp(a));
            assert_eq!(keys, all[..k.min(all.len())].to_vec(), "k={k}");
        }
        // Rising rows refill the buffer many times.
        let rising: Vec<f32> = (0..3000).map(|i| i as f32).collect();
        top_keys(&rising, 3, &mut keys);
        keys.sort_by(|a, b| b.cmp(a));
        assert_eq!(keys.iter().map(|&k| key_id(k)).collect::<Vec<_>>(), vec![2999, 2998, 2997]);
    }

    #[test]
    fn nucleus_len_matches_a_full_sort() {
        for (n, seed) in [(1usize, 1u64), (10, 2), (64, 3), (65, 4), (1000, 5), (49152, 6)] {
            let logits = row(n, seed);
            let max = max_value(&logits);
            let weights: Vec<f32> = logits.iter().map(|&l| exp_fast(l - max)).collect();
            let weight = |k: u64| weights[key_id(k) as usize];
            let keys: Vec<u64> = logits.iter().enumerate().map(|(i, &l)| rank_key(l, i as u32)).collect();
            let mut sorted = keys.clone();
            sorted.sort_by(|a, b| b.cmp(a));
            let total: f64 = weights.iter().map(|&w| w as f64).sum();
            for top_p in [1e-6, 0.01, 0.1, 0.3, 0.5, 0.9, 0.99, 1.0] {
                let budget = top_p * total;
                let mut acc = 0.0;
                let mut want = sorted.len();
                for (i, &k) in sorted.iter().enumerate() {
                    if acc >= budget {
                        want = i.max(1);
                        break;
                    }
                    acc += weight(k) as f64;
                }
                let mut work = keys.clone();
                let got = nucleus_len(&mut work, budget, weight);
                // Float sums in a different order may move the cut by one token.
                assert!(got.abs_diff(want) <= 1, "n={n} top_p={top_p}: {got} vs {want}");
                let mut kept = work[..got].to_vec();
                kept.sort_by(|a, b| b.cmp(a));
                assert_eq!(kept, sorted[..got].to_vec(), "n={n} top_p={top_p}: kept set is not the head");
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = -90.0f32;
        while x <= 10.0 {
            let want = (x as f64).exp();
            let got = exp_fast(x) as f64;
            if x < -87.33 {
                assert_eq!(got, 0.0);
            } else {
                assert!(((got - want) / want).abs() < 4e-7, "x={x}: {got} vs {want}");
            }
            x += 0.0137;
        }
        assert_eq!(exp_fast(0.0), 1.0);
        assert_eq!(exp_fast(f32::NEG_INFINITY), 0.0);
        assert_eq!(max_value(&[f32::NAN, 1.0, 3.0, 2.0, f32::NAN, 0.0, -1.0, 2.5, 2.9, 3.0]), 3.0);
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]), 1);
    }

    #[test]
    fn penalties_change_the_right_logits() {
        let logits = [2.0f32, -2.0, 1.0, 0.5, 3.0];
        let run = |p: SamplingParams, prompt: &[u32], gen: &[u32]| {
            let mut s = Sampler::new(&p);
            s.work = logits.to_vec();
            s.apply_penalties(prompt, gen);
            s.work.clone()
        };
        let rep = run(params(|p| p.repetition_penalty = 2.0), &[0, 1, 1], &[4, 99]);
        assert_eq!(rep, vec![1.0, -4.0, 1.0, 0.5, 1.5]);
        let freq = run(params(|p| p.frequency_penalty = 0.5), &[2], &[3, 3, 0, 3]);
        assert_eq!(freq, vec![1.5, -2.0, 1.0, -1.0, 3.0]);
        let pres = run(params(|p| p.presence_penalty = 1.0), &[2], &[3, 3, 0]);
        assert_eq!(pres, vec![1.0, -2.0, 1.0, -0.5, 3.0]);
        let both = run(
            params(|p| {
                p.presence_penalty = -1.0;
                p.frequency_penalty = 1.0
            }),
            &[],
            &[1, 1],
        );
        assert_eq!(both, vec![2.0, -3.0, 1.0, 0.5, 3.0]);
        // Scratch state is clean for the next call.
        let mut s = Sampler::new(&params(|p| {
            p.repetition_penalty = 2.0;
            p.frequency_penalty = 1.0
        }));
        s.work = logits.to_vec();
        s.apply_penalties(&[0], &[0]);
        assert!(s.seen.iter().all(|&x| !x) && s.counts.iter().all(|&c| c == 0));
        // Greedy honours penalties: token 4 (3.0) loses to token 0 (2.0) after a 2x penalty.
        let mut g = Sampler::new(&params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 2.0
        }));
        assert_eq!(g.sample(&logits, &[], &[4]).id, 0);
    }

    #[test]
    fn logprobs_are_raw_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let mut s = Sampler::new(&params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 2.0;
            p.logprobs = Some(3);
        }));
        let out = s.sample(&logits, &[1, 3], &[]);
        let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        let lp = |i: usize| (logits[i] as f64 - lse) as f32;
        // Penalised, 2 wins; its logprob is from the raw row.
        assert_eq!(out.id, 2);
        assert!((out.logprob - lp(2)).abs() < 1e-6);
        let ids: Vec<u32> = out.top_logprobs.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        for &(i, l) in &out.top_logprobs {
            assert!((l - lp(i as usize)).abs() < 1e-6);
        }
        let none = Sampler::new(&params(|p| p.temperature = 0.0)).sample(&logits, &[], &[]);
        assert!(none.top_logprobs.is_empty());
        assert_eq!(top_n(&[1.0, 5.0, 5.0, f32::NAN, 2.0], 10), vec![(1, 5.0), (2, 5.0), (4, 2.0), (0, 1.0)]);
    }

    #[test]
    fn degenerate_rows_do_not_panic() {
        let mut s = Sampler::new(&params(|p| p.seed = Some(1)));
        assert_eq!(s.sample(&[], &[], &[]).id, 0);
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 4], &[7], &[9]).id, 0);
        assert_eq!(s.sample(&[f32::NAN, 0.0, f32::NAN], &[], &[]).id, 1);
        let mut k = Sampler::new(&params(|p| {
            p.seed = Some(1);
            p.top_k = 3;
            p.top_p = 0.5
        }));
        assert_eq!(k.sample(&[f32::NEG_INFINITY, 1.0], &[], &[]).id, 1);
    }

    #[test]
    fn validation_errors() {
        let v = 100;
        assert!(SamplingParams::default().validate(v).is_ok());
        let cases: Vec<(SamplingParams, &str)> = vec![
            (params(|p| p.temperature = -0.1), "temperature"),
            (params(|p| p.temperature = f32::NAN), "temperature"),
            (params(|p| p.temperature = f32::INFINITY), "temperature"),
            (params(|p| p.top_p = 0.0), "top_p"),
            (params(|p| p.top_p = 1.01), "top_p"),
            (params(|p| p.top_p = f32::NAN), "top_p"),
            (params(|p| p.min_p = -0.01), "min_p"),
            (params(|p| p.min_p = 1.5), "min_p"),
            (params(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
            (params(|p| p.repetition_penalty = -1.0), "repetition_penalty"),
            (params(|p| p.presence_penalty = 2.5), "presence_penalty"),
            (params(|p| p.frequency_penalty = -2.01), "frequency_penalty"),
            (params(|p| p.frequency_penalty = f32::NAN), "frequency_penalty"),
            (params(|p| p.max_tokens = 0), "max_tokens"),
            (params(|p| p.logprobs = Some(21)), "logprobs"),
            (params(|p| p.stop_token_ids = vec![3, 100]), "stop_token_ids"),
            (params(|p| p.stop = vec![String::new()]), "stop"),
        ];
        for (p, field) in cases {
            match p.validate(v) {
                Err(EngineError::InvalidRequest(msg)) => assert!(msg.contains(field), "{field}: {msg}"),
                other => panic!("{field}: expected InvalidRequest, got {other:?}"),
            }
        }
        let edge = params(|p| {
            p.temperature = 0.0;
            p.top_p = 1.0;
            p.min_p = 1.0;
            p.presence_penalty = -2.0;
            p.frequency_penalty = 2.0;
            p.logprobs = Some(20);
            p.stop_token_ids = vec![99];
        });
        assert!(edge.validate(v).is_ok());
    }

    #[test]
    fn sampler_moves_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Sampler>();
        assert_send_sync::<SamplingParams>();
    }

    #[test]
    fn params_deserialize_with_defaults() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature":0.7,"stop":["\n"]}"#).unwrap();
        assert_eq!(p.temperature, 0.7);
        assert_eq!(p.stop, vec!["\n".to_string()]);
        assert_eq!(p.max_tokens, SamplingParams::default().max_tokens);
    }
}
