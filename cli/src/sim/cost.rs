//! The cost models `tandem sim` runs on, as `tandem profile` writes them (or a person, for
//! hardware this machine does not have): what one engine step takes for the tokens it
//! computes, how long KV takes over a link, and what the router adds to a request.
//!
//! One step of the engine computes a batch in which every sequence brings some new tokens
//! after some context (a prefill chunk: many tokens after a cached prefix; a decode: one
//! token after its whole context). Its time is modelled as
//!
//! `base + token × tokens + seq × sequences + attn × pairs / 1000 + prompt × prompt chunks`
//!
//! where `pairs` counts, over the sequences, each new token times the positions it attends
//! to: the quadratic part of a long prefill and the linear-in-context part of a decode.
//! The first four coefficients are fitted by least squares to measured forward passes; the
//! engine's own work beyond them (per step, per sequence, and per prompt chunk: a request
//! taken into a step to compute its prompt) is measured on the engine and added.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tandem_engine::scheduler::StepPlan;

/// One step's time: `base_ms + token_ms × tokens + seq_ms × sequences + attn_ms × pairs / 1000
/// + prompt_ms × prompt chunks`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct StepCost {
    pub base_ms: f64,
    pub token_ms: f64,
    pub seq_ms: f64,
    /// Per thousand (new token, attended position) pairs.
    pub attn_ms: f64,
    /// Per sequence computing prompt tokens in the step (more than one new token).
    #[serde(default)]
    pub prompt_ms: f64,
}

/// What a step computes, as the cost model counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    pub tokens: f64,
    pub seqs: f64,
    /// (new token, attended position) pairs.
    pub pairs: f64,
    /// Sequences computing more than one token: prompt chunks.
    pub prompts: f64,
}

impl StepShape {
    /// A step of `new` tokens after `context` cached ones, for each of `seqs` sequences.
    pub fn uniform(seqs: usize, context: usize, new: usize) -> StepShape {
        let mut s = StepShape::default();
        for _ in 0..seqs {
            s.add(context, new);
        }
        s
    }

    /// One sequence computing `len` tokens from position `start`.
    pub fn add(&mut self, start: usize, len: usize) {
        self.tokens += len as f64;
        self.seqs += 1.0;
        if len > 1 {
            self.prompts += 1.0;
        }
        // Token i (0-based) of the chunk attends to start + i + 1 positions.
        self.pairs += len as f64 * start as f64 + (len as f64 * (len as f64 + 1.0)) / 2.0;
    }

    pub fn of_plan(plan: &StepPlan) -> StepShape {
        let mut s = StepShape::default();
        for e in &plan.scheduled {
            s.add(e.start, e.len);
        }
        s
    }

    fn features(&self) -> [f64; 4] {
        [1.0, self.tokens, self.seqs, self.pairs / 1000.0]
    }
}

impl StepCost {
    /// Seconds the step takes.
    pub fn seconds(&self, s: &StepShape) -> f64 {
        let [one, t, q, p] = s.features();
        (self.base_ms * one + self.token_ms * t + self.seq_ms * q + self.attn_ms * p + self.prompt_ms * s.prompts) / 1e3
    }

    /// Every step `factor` times faster (a faster machine, by hand).
    pub fn faster(&self, factor: f64) -> StepCost {
        StepCost {
            base_ms: self.base_ms / factor,
            token_ms: self.token_ms / factor,
            seq_ms: self.seq_ms / factor,
            attn_ms: self.attn_ms / factor,
            prompt_ms: self.prompt_ms / factor,
        }
    }

    /// Least squares over `points` (shape, measured ms), no coefficient negative: a
    /// coefficient that comes out negative is dropped (held at 0) and the rest refitted.
    pub fn fit(points: &[(StepShape, f64)]) -> Result<StepCost> {
        // A feature no point exercises (every value 0) cannot be fitted: held at 0.
        let mut active = [0, 1, 2, 3].map(|i| points.iter().any(|(s, _)| s.features()[i] != 0.0));
        loop {
            let idx: Vec<usize> = (0..4).filter(|&i| active[i]).collect();
            if points.len() < idx.len() {
                bail!("{} measured steps cannot fit {} coefficients", points.len(), idx.len());
            }
            let n = idx.len();
            // Normal equations, each row scaled by 1/measured: relative error counts, so
            // short decode steps weigh as much as long prefills.
            let mut a = vec![vec![0.0; n + 1]; n];
            for (shape, ms) in points {
                let f = shape.features();
                let w = 1.0 / ms.max(1e-6);
                for (r, &i) in idx.iter().enumerate() {
                    for (c, &j) in idx.iter().enumerate() {
                        a[r][c] += f[i] * f[j] * w * w;
                    }
                    a[r][n] += f[i] * ms * w * w;
                }
            }
            let x = solve(a).context("the measured steps do not determine the cost model")?;
            let mut coef = [0.0; 4];
            for (r, &i) in idx.iter().enumerate() {
                coef[i] = x[r];
            }
            match (0..4).filter(|&i| active[i] && coef[i] < 0.0).min_by(|&a, &b| coef[a].total_cmp(&coef[b])) {
                Some(i) => active[i] = false,
                None => {
                    return Ok(StepCost {
                        base_ms: coef[0],
                        token_ms: coef[1],
                        seq_ms: coef[2],
                        attn_ms: coef[3],
                        prompt_ms: 0.0,
                    })
                }
            }
        }
    }
}

/// Gaussian elimination with partial pivoting on an augmented n × (n+1) matrix.
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let n = a.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[piv][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, piv);
        let pivot = a[col].clone();
        for (_, row) in a.iter_mut().enumerate().filter(|(r, _)| *r != col) {
            let f = row[col] / pivot[col];
            for (x, p) in row[col..].iter_mut().zip(&pivot[col..]) {
                *x -= f * p;
            }
        }
    }
    Some((0..n).map(|i| a[i][n] / a[i][i]).collect())
}

/// A link KV crosses: a fixed latency per transfer and a bandwidth.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Link {
    pub latency_ms: f64,
    pub gb_per_s: f64,
}

impl Link {
    /// Seconds to move `bytes`, latency included.
    pub fn seconds(&self, bytes: f64) -> f64 {
        self.latency_ms / 1e3 + bytes / (self.gb_per_s * 1e9)
    }
}

/// One measured point of a profile (a forward pass and a greedy draw), beside what the fitted
/// forward-only model says of it (the profile's step model adds the engine's own per-step and
/// per-sequence work to it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// `prefill`, `prefix` (new tokens after a cached prefix) or `decode`.
    pub kind: String,
    pub seqs: usize,
    pub context: usize,
    pub new_tokens: usize,
    pub measured_ms: f64,
    pub fitted_ms: f64,
}

/// Everything `tandem sim` needs to know of the hardware and the model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Costs {
    /// Where the figures come from (`tandem profile` on a machine, or a hand profile's name).
    pub source: String,
    pub step: StepCost,
    /// KV bytes one token takes (every layer, K and V).
    pub kv_bytes_per_token: f64,
    /// The model's layers: KV moves layer by layer, so all but the last layer's share of a
    /// transfer can hide behind the prefill.
    pub layers: usize,
    /// Links by name (`shm`, `tcp`, or any given by hand).
    pub links: BTreeMap<String, Link>,
    /// What the router adds to a request before it reaches a worker (tokenize, hash, route).
    pub router_ms: f64,
    /// One control hop (router to worker or back).
    pub rpc_ms: f64,
    /// KV blocks of one worker's pool, and tokens per block.
    pub kv_blocks: usize,
    pub block_size: usize,
    /// The measured steps the step model was fitted to, with its fit.
    #[serde(default)]
    pub points: Vec<Point>,
}

impl Costs {
    pub fn load(path: &std::path::Path) -> Result<Costs> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cost model {}", path.display()))?;
        let c: Costs = serde_json::from_str(&text).with_context(|| format!("cost model {}", path.display()))?;
        c.check().with_context(|| format!("cost model {}", path.display()))?;
        Ok(c)
    }

    /// Refuses a model that would make time run backwards or never advance.
    pub fn check(&self) -> Result<()> {
        let s = self.step;
        let all = [
            s.base_ms,
            s.token_ms,
            s.seq_ms,
            s.attn_ms,
            s.prompt_ms,
            self.router_ms,
            self.rpc_ms,
            self.kv_bytes_per_token,
        ];
        if all.iter().any(|x| !x.is_finite() || *x < 0.0) {
            bail!("every cost must be finite and >= 0");
        }
        if s.base_ms + s.token_ms <= 0.0 {
            bail!("a step must take some time (base_ms + token_ms > 0)");
        }
        if self.kv_blocks == 0 || self.block_size == 0 || self.layers == 0 {
            bail!("kv_blocks, block_size and layers must be positive");
        }
        for (name, l) in &self.links {
            if !(l.latency_ms.is_finite() && l.latency_ms >= 0.0 && l.gb_per_s.is_finite() && l.gb_per_s > 0.0) {
                bail!("link {name}: latency_ms >= 0 and gb_per_s > 0");
            }
        }
        Ok(())
    }

    pub fn link(&self, name: &str) -> Result<Link> {
        self.links.get(name).copied().with_context(|| {
            format!("no link {name:?} in the cost model (it has {:?})", self.links.keys().collect::<Vec<_>>())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fit_recovers_the_coefficients_it_was_made_from() {
        let truth = StepCost { base_ms: 3.0, token_ms: 0.5, seq_ms: 0.2, attn_ms: 0.01, prompt_ms: 0.0 };
        let shapes = [
            StepShape::uniform(1, 0, 16),
            StepShape::uniform(1, 0, 256),
            StepShape::uniform(1, 0, 1024),
            StepShape::uniform(1, 1024, 128),
            StepShape::uniform(1, 128, 1),
            StepShape::uniform(8, 128, 1),
            StepShape::uniform(32, 1024, 1),
        ];
        let points: Vec<(StepShape, f64)> = shapes.iter().map(|s| (*s, truth.seconds(s) * 1e3)).collect();
        let fit = StepCost::fit(&points).unwrap();
        for (a, b) in [
            (fit.base_ms, truth.base_ms),
            (fit.token_ms, truth.token_ms),
            (fit.seq_ms, truth.seq_ms),
            (fit.attn_ms, truth.attn_ms),
        ] {
            assert!((a - b).abs() < 1e-6 * b.max(1.0), "{fit:?} vs {truth:?}");
        }
    }

    #[test]
    fn a_coefficient_the_data_makes_negative_is_held_at_zero() {
        // Time falls with sequences at equal tokens: no positive per-sequence cost fits.
        let points = vec![
            (StepShape { tokens: 10.0, seqs: 1.0, pairs: 0.0, prompts: 1.0 }, 12.0),
            (StepShape { tokens: 10.0, seqs: 5.0, pairs: 0.0, prompts: 5.0 }, 10.0),
            (StepShape { tokens: 20.0, seqs: 1.0, pairs: 0.0, prompts: 1.0 }, 22.0),
            (StepShape { tokens: 40.0, seqs: 2.0, pairs: 0.0, prompts: 2.0 }, 41.0),
            (StepShape { tokens: 5.0, seqs: 1.0, pairs: 0.0, prompts: 1.0 }, 7.0),
        ];
        let fit = StepCost::fit(&points).unwrap();
        assert_eq!(fit.seq_ms, 0.0);
        assert!(fit.base_ms >= 0.0 && fit.token_ms > 0.0 && fit.attn_ms >= 0.0, "{fit:?}");
    }

    #[test]
    fn pairs_count_each_new_token_against_what_it_attends_to() {
        // Two tokens after 3 cached: they attend to 4 and 5 positions.
        assert_eq!(StepShape::uniform(1, 3, 2).pairs, 9.0);
        // A decode of 4 sequences at 100 tokens of context: 101 each.
        assert_eq!(StepShape::uniform(4, 100, 1).pairs, 404.0);
    }
}
