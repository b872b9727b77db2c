//! Element-wise and row-wise ops of the Llama block: RMSNorm, RoPE, SwiGLU, adds.
//!
//! These are memory-light and run on the caller's thread per token row; the
//! model parallelizes over tokens where a batch is large enough to pay.

/// `out = x / sqrt(mean(x^2) + eps) * w` for one row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mut sum = 0f64;
    for &v in x {
        sum += (v as f64) * (v as f64);
    }
    let scale = 1.0 / ((sum / x.len() as f64) as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// Cos/sin tables for rotary embeddings, one row of `head_dim / 2` pairs per position.
///
/// Angles are built the way GGML builds them (`theta *= base^(-2/d)` pair by
/// pair, in f32) so positions match the reference implementation bit for bit.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub half: usize,
    pub max_pos: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_dim: usize, base: f32, max_pos: usize) -> Self {
        let half = head_dim / 2;
        let theta_scale = base.powf(-2.0 / head_dim as f32);
        let mut cos = vec![0f32; max_pos * half];
        let mut sin = vec![0f32; max_pos * half];
        for p in 0..max_pos {
            let mut theta = p as f32;
            for i in 0..half {
                cos[p * half + i] = theta.cos();
                sin[p * half + i] = theta.sin();
                theta *= theta_scale;
            }
        }
        RopeTable { half, max_pos, cos, sin }
    }

    /// Rotates the pairs `(x[i], x[i + d/2])` of every head in `x` (the GPT-NeoX
    /// mode, which Qwen2 GGUFs keep): frequency `i` turns element `i` with its twin
    /// half a head away.
    pub fn apply_halves(&self, x: &mut [f32], pos: usize) {
        let c = &self.cos[pos * self.half..(pos + 1) * self.half];
        let s = &self.sin[pos * self.half..(pos + 1) * self.half];
        for head in x.chunks_exact_mut(2 * self.half) {
            let (lo, hi) = head.split_at_mut(self.half);
            for i in 0..self.half {
                let (x0, x1) = (lo[i], hi[i]);
                lo[i] = x0 * c[i] - x1 * s[i];
                hi[i] = x0 * s[i] + x1 * c[i];
            }
        }
    }

    /// Rotates adjacent pairs `(x[2i], x[2i+1])` of every head in `x` (Llama's
    /// "normal" RoPE, as in GGUF files converted from Hugging Face checkpoints).
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let c = &self.cos[pos * self.half..(pos + 1) * self.half];
        let s = &self.sin[pos * self.half..(pos + 1) * self.half];
        for head in x.chunks_exact_mut(2 * self.half) {
            for i in 0..self.half {
                let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = x0 * c[i] - x1 * s[i];
                head[2 * i + 1] = x0 * s[i] + x1 * c[i];
            }
        }
    }
}

/// `gate = silu(gate) * up`, in place.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let v = *g;
        *g = v / (1.0 + (-v).exp()) * u;
    }
}

/// `swiglu` on the fastest path the ISA allows.
pub fn swiglu_isa(isa: crate::cpu::Isa, gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa == crate::cpu::Isa::Avx512Vnni {
        // SAFETY: the ISA was detected.
        unsafe { crate::x86_attn::swiglu512(gate, up) };
        return;
    }
    let _ = isa;
    swiglu(gate, up)
}

/// `x += y`.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_rows() {
        let x = [3.0f32, 4.0];
        let mut out = [0f32; 2];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut out);
        let rms = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6);
        assert!((out[1] - 8.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_norms() {
        let t = RopeTable::new(4, 10000.0, 8);
        let mut x = [1.0f32, 0.0, 0.0, 1.0];
        t.apply(&mut x, 0);
        assert_eq!(x, [1.0, 0.0, 0.0, 1.0]);
        t.apply(&mut x, 3);
        assert!((x[0] - 3f32.cos()).abs() < 1e-6 && (x[1] - 3f32.sin()).abs() < 1e-6);
        assert!((x[2] * x[2] + x[3] * x[3] - 1.0).abs() < 1e-5);
    }

    #[test]
    fn halves_rotate_the_same_pairs_as_adjacent_after_an_interleave() {
        let t = RopeTable::new(8, 1_000_000.0, 64);
        let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        // Head of 8 in halves order: pairs (0,4), (1,5), (2,6), (3,7). Interleave each head so the
        // same pairs sit side by side, rotate with the adjacent mode, and undo the interleave.
        let inter = |h: &[f32]| -> Vec<f32> { (0..4).flat_map(|i| [h[i], h[i + 4]]).collect() };
        let mut want = Vec::new();
        for h in x.chunks(8) {
            let mut a = inter(h);
            t.apply(&mut a, 37);
            want.extend((0..8).map(|k| if k < 4 { a[2 * k] } else { a[2 * (k - 4) + 1] }));
        }
        let mut got = x.clone();
        t.apply_halves(&mut got, 37);
        assert_eq!(got, want);
        assert_ne!(got, x);
    }
}
