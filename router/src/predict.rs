//! Output-length prediction from the prompt, for shortest-job-first scheduling.
//!
//! The router knows a request's prompt token ids before any worker sees it, so it predicts
//! there and the prediction travels with the request (`Scheduling.predicted_output_tokens`):
//! a decode worker has it before the KV arrives. The model is a linear regression of
//! `ln(1 + output tokens)` on hashed features of the prompt: which token ids and which
//! pairs of adjacent ids occur (one bucket each among `buckets`, 1 if present), plus
//! `ln(1 + prompt tokens)`. Instructions drive a small chat model's
//! answer length ("in one word", "a haiku", "a long story"), and words are tokens.
//!
//! `scripts/train-length-predictor.sh` fits it (`tandem predictor train`) on the model's own
//! greedy generations of a varied prompt mix and reports Kendall's tau on held-out prompts;
//! the fitted weights are committed (`router/length-predictor.json`) and compiled in.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The predictor the router uses unless `--length-predictor` names another.
pub const BUILT_IN: &str = include_str!("../length-predictor.json");

/// A fitted predictor, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LengthPredictor {
    /// The model whose generations it was fitted on (for operators; not checked).
    pub model: String,
    /// Hash buckets of the token and token-pair features (a power of two).
    pub buckets: usize,
    pub bias: f64,
    /// Weight of `ln(1 + prompt tokens)`.
    pub length_weight: f64,
    /// One weight per bucket.
    pub weights: Vec<f64>,
    /// How it was made and how well it ranks held-out prompts.
    pub trained_on: usize,
    pub held_out: usize,
    pub kendall_tau: f64,
    /// The command that made it.
    pub recipe: String,
}

/// Multiplicative hashing constants (odd 64-bit numbers, golden-ratio based).
const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// The feature buckets `prompt` sets, each once.
pub fn features(prompt: &[u32], buckets: usize) -> Vec<usize> {
    let mask = buckets.next_power_of_two() - 1;
    let mut set = BTreeSet::new();
    for (i, &t) in prompt.iter().enumerate() {
        set.insert(((t as u64).wrapping_mul(K1) >> 32) as usize & mask);
        if i > 0 {
            let pair = (prompt[i - 1] as u64).wrapping_mul(K2) ^ (t as u64).wrapping_mul(K1).rotate_left(17);
            set.insert((pair.wrapping_mul(K1) >> 32) as usize & mask);
        }
    }
    set.into_iter().collect()
}

impl LengthPredictor {
    /// Reads a predictor from `path`.
    pub fn load(path: &Path) -> Result<LengthPredictor, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks a stored predictor.
    pub fn parse(text: &str) -> Result<LengthPredictor, String> {
        let p: LengthPredictor = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if p.buckets == 0 || !p.buckets.is_power_of_two() || p.weights.len() != p.buckets {
            return Err(format!("{} weights for {} buckets (a power of two)", p.weights.len(), p.buckets));
        }
        if !(p.bias.is_finite() && p.length_weight.is_finite() && p.weights.iter().all(|w| w.is_finite())) {
            return Err("a weight is not a finite number".into());
        }
        Ok(p)
    }

    /// The built-in predictor.
    pub fn built_in() -> LengthPredictor {
        Self::parse(BUILT_IN).expect("the committed predictor parses")
    }

    /// `ln(1 + output tokens)` predicted for `prompt`.
    pub fn score(&self, prompt: &[u32]) -> f64 {
        let f = features(prompt, self.buckets);
        self.bias
            + self.length_weight * (1.0 + prompt.len() as f64).ln()
            + f.iter().map(|&b| self.weights[b]).sum::<f64>()
    }

    /// Output tokens predicted for `prompt`, at least 1 and at most `max_tokens`.
    pub fn predict(&self, prompt: &[u32], max_tokens: u32) -> u32 {
        let n = self.score(prompt).exp() - 1.0;
        (n.round().max(1.0) as u32).min(max_tokens.max(1))
    }

    /// Fits a predictor by ridge regression (`lambda` on the bucket weights) of
    /// `ln(1 + output)` on the features of each `(prompt, output tokens)` sample.
    pub fn fit(samples: &[(Vec<u32>, u32)], buckets: usize, lambda: f64) -> LengthPredictor {
        let buckets = buckets.next_power_of_two();
        // Columns: the buckets, then ln(1 + prompt length), then the bias.
        let d = buckets + 2;
        let mut a = vec![0.0f64; d * d];
        let mut b = vec![0.0f64; d];
        for (prompt, out) in samples {
            let mut x: Vec<(usize, f64)> = features(prompt, buckets).into_iter().map(|i| (i, 1.0)).collect();
            x.push((buckets, (1.0 + prompt.len() as f64).ln()));
            x.push((buckets + 1, 1.0));
            let y = (1.0 + *out as f64).ln();
            for &(i, xi) in &x {
                b[i] += xi * y;
                for &(j, xj) in &x {
                    a[i * d + j] += xi * xj;
                }
            }
        }
        for i in 0..d {
            // The bias is not shrunk; a little on the length term keeps it well posed.
            a[i * d + i] += if i == d - 1 { 1e-9 } else { lambda };
        }
        let w = solve_spd(&mut a, &mut b, d);
        LengthPredictor {
            model: String::new(),
            buckets,
            bias: w[d - 1],
            length_weight: w[buckets],
            weights: w[..buckets].to_vec(),
            trained_on: samples.len(),
            held_out: 0,
            kendall_tau: 0.0,
            recipe: String::new(),
        }
    }
}

/// Solves `a x = b` for a symmetric positive definite `a` (n × n, row-major) by Cholesky;
/// `a` and `b` are overwritten.
fn solve_spd(a: &mut [f64], b: &mut [f64], n: usize) -> Vec<f64> {
    for j in 0..n {
        let mut s = a[j * n + j];
        for k in 0..j {
            s -= a[j * n + k] * a[j * n + k];
        }
        let l = s.max(1e-12).sqrt();
        a[j * n + j] = l;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / l;
        }
    }
    // L y = b, then Lᵀ x = y.
    for i in 0..n {
        let mut s = b[i];
        for k in 0..i {
            s -= a[i * n + k] * b[k];
        }
        b[i] = s / a[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = b[i];
        for k in i + 1..n {
            s -= a[k * n + i] * b[k];
        }
        b[i] = s / a[i * n + i];
    }
    b.to_vec()
}

/// Kendall's tau-b between two rankings (ties in either count as neither concordant nor
/// discordant, and shrink the denominator).
pub fn kendall_tau(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    let (mut conc, mut disc, mut tx, mut ty) = (0f64, 0f64, 0f64, 0f64);
    for i in 0..n {
        for j in i + 1..n {
            let dx = (x[i] - x[j]).signum() * ((x[i] != x[j]) as i32 as f64);
            let dy = (y[i] - y[j]).signum() * ((y[i] != y[j]) as i32 as f64);
            if dx == 0.0 && dy == 0.0 {
                continue;
            }
            if dx == 0.0 {
                tx += 1.0;
            } else if dy == 0.0 {
                ty += 1.0;
            } else if dx == dy {
                conc += 1.0;
            } else {
                disc += 1.0;
            }
        }
    }
    let denom = ((conc + disc + tx) * (conc + disc + ty)).sqrt();
    if denom == 0.0 {
        0.0
    } else {
        (conc - disc) / denom
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kendall_tau_of_known_rankings() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(kendall_tau(&a, &a), 1.0);
        assert_eq!(kendall_tau(&a, &[4.0, 3.0, 2.0, 1.0]), -1.0);
        // One swapped pair of six: (5 - 1) / 6.
        assert!((kendall_tau(&a, &[1.0, 3.0, 2.0, 4.0]) - 4.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn a_fit_learns_which_tokens_mean_long_answers() {
        // Prompts that contain token 7 ("story") get ~200 tokens, token 9 ("word") ~3; the
        // rest of a prompt is drawn from a few dozen common tokens (topics, function words).
        let mut samples = Vec::new();
        for i in 0..200u32 {
            let filler: Vec<u32> = (0..(i % 13 + 3)).map(|k| 100 + (i * 31 + k * 7) % 40).collect();
            let (mark, out) = if i % 2 == 0 { (7, 200 + i % 17) } else { (9, 3 + i % 3) };
            let mut p = filler.clone();
            p.push(mark);
            samples.push((p, out));
        }
        let (train, test) = samples.split_at(150);
        let p = LengthPredictor::fit(train, 256, 1.0);
        let predicted: Vec<f64> = test.iter().map(|(x, _)| p.score(x)).collect();
        let actual: Vec<f64> = test.iter().map(|(_, y)| *y as f64).collect();
        // Every long answer is predicted longer than every short one; within a kind the
        // order is noise, which caps tau near 0.5 for two equal kinds.
        let long_min = test.iter().filter(|(x, _)| x.contains(&7)).map(|(x, _)| p.score(x)).fold(f64::MAX, f64::min);
        let short_max = test.iter().filter(|(x, _)| x.contains(&9)).map(|(x, _)| p.score(x)).fold(f64::MIN, f64::max);
        assert!(long_min > short_max, "{long_min} {short_max}");
        assert!(kendall_tau(&predicted, &actual) > 0.4, "{}", kendall_tau(&predicted, &actual));
        assert!(p.predict(&[101, 7], 1000) > 50);
        assert!(p.predict(&[101, 9], 1000) < 10);
        assert_eq!(p.predict(&[101, 7], 16), 16, "max_tokens caps it");
        // It stores and loads unchanged (to the last few bits of a float's text form).
        let back = LengthPredictor::parse(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!((back.buckets, back.weights.len()), (p.buckets, p.weights.len()));
        for (x, y) in [(back.bias, p.bias), (back.length_weight, p.length_weight)]
            .into_iter()
            .chain(back.weights.iter().copied().zip(p.weights.iter().copied()))
        {
            assert!((x - y).abs() <= 1e-12 * y.abs().max(1.0), "{x} {y}");
        }
    }

    #[test]
    fn a_stored_predictor_with_the_wrong_shape_is_refused() {
        let mut p = LengthPredictor::fit(&[(vec![1, 2], 3), (vec![4], 5)], 8, 1.0);
        p.weights.pop();
        assert!(LengthPredictor::parse(&serde_json::to_string(&p).unwrap()).is_err());
        assert!(LengthPredictor::parse("{").is_err());
    }

    #[test]
    fn the_built_in_predictor_loads() {
        let p = LengthPredictor::built_in();
        assert!(p.trained_on > 0 && p.kendall_tau > 0.0, "{p:?}");
    }
}
