//! Matrix multiplication of activations by weights: `out[t][r] = sum_c x[t][c] * w[r][c]`.
//!
//! Activations are quantized once per matmul input to 8-bit blocks of 32
//! (`QuantizedActs`) and reused by every output row and by every matrix that
//! reads the same input (Q, K and V; gate and up). The kernels then work in
//! integers: per block `d_w * d_x * sum(u * q) + m_w * s_x`.
//!
//! Work is split over the pool by output rows. Each thread walks its rows in
//! tiles of four and the tokens in tiles of four, so a weight tile is loaded
//! once and applied to several tokens while it sits in registers.

use half::f16;

use crate::cpu::Isa;
use crate::packed::{PackedMatrix, Weights};
use crate::pool::{split_range, SyncPtr, ThreadPool};
use crate::quant::QK;

/// A batch of activation rows quantized to signed 8-bit blocks of 32.
#[derive(Debug, Clone, Default)]
pub struct QuantizedActs {
    pub n: usize,
    pub cols: usize,
    /// Blocks per row, rounded up to even (zero-padded).
    pub nbp: usize,
    pub qs: Vec<i8>,
    /// Per-block scale (rounded to f16 precision, as GGML's Q8 formats store it).
    pub d: Vec<f32>,
    /// Per-block `d * sum(q)`.
    pub s: Vec<f32>,
    /// Per pair of blocks, 16 floats: the even block's scale 8 times, then the odd one's.
    pub dexp: Vec<f32>,
}

impl QuantizedActs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantizes `n` rows of `cols` from `x`, reusing this buffer's memory.
    pub fn quantize(&mut self, pool: &ThreadPool, isa: Isa, x: &[f32], n: usize, cols: usize) {
        assert_eq!(cols % QK, 0, "activation rows must be whole blocks of {QK}");
        assert!(x.len() >= n * cols);
        let nb = cols / QK;
        let nbp = nb.div_ceil(2) * 2;
        self.n = n;
        self.cols = cols;
        self.nbp = nbp;
        self.qs.resize(n * nbp * QK, 0);
        self.d.resize(n * nbp, 0.0);
        self.s.resize(n * nbp, 0.0);
        self.dexp.resize(n * nbp * 8, 0.0);
        let qs = SyncPtr::new(&mut self.qs);
        let d = SyncPtr::new(&mut self.d);
        let s = SyncPtr::new(&mut self.s);
        let dexp = SyncPtr::new(&mut self.dexp);
        let work = |tid: usize, nt: usize| {
            for t in split_range(n, tid, nt, 1) {
                // SAFETY: each token's slices are owned by exactly one thread.
                let (qs, d, s, dexp) = unsafe {
                    (
                        qs.slice(t * nbp * QK, nbp * QK),
                        d.slice(t * nbp, nbp),
                        s.slice(t * nbp, nbp),
                        dexp.slice(t * nbp * 8, nbp * 8),
                    )
                };
                quantize_row(isa, &x[t * cols..(t + 1) * cols], qs, d, s);
                for b in nb..nbp {
                    qs[b * QK..(b + 1) * QK].fill(0);
                    d[b] = 0.0;
                    s[b] = 0.0;
                }
                for p in 0..nbp / 2 {
                    dexp[p * 16..p * 16 + 8].fill(d[2 * p]);
                    dexp[p * 16 + 8..p * 16 + 16].fill(d[2 * p + 1]);
                }
            }
        };
        if n * cols >= 4096 {
            pool.run(work);
        } else {
            work(0, 1);
        }
    }
}

fn quantize_row(isa: Isa, x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni {
        // SAFETY: the ISA was detected.
        unsafe { crate::x86::quantize_row_avx512(x, qs, d, s) };
        return;
    }
    let _ = isa;
    quantize_row_scalar(x, qs, d, s)
}

/// The reference quantizer: per block, d = max|x| / 127, q = round_half_even(x * 127 / max|x|)
/// (GGML's Q8_1 recipe; d is kept at f16 precision, s = d * sum(q) in f32).
pub fn quantize_row_scalar(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (b, blk) in x.chunks_exact(QK).enumerate() {
        let amax = blk.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for j in 0..QK {
            let q = (blk[j] * inv).round_ties_even() as i32;
            qs[b * QK + j] = q as i8;
            sum += q;
        }
        let dr = f16::from_f32(scale).to_f32();
        d[b] = dr;
        s[b] = dr * sum as f32;
    }
}

/// `out[t * rows + r] = x[t] . w[r]` for `n` tokens. `xq` must hold `x` quantized
/// (dense weights read `x` itself). 8-bit weights are summed exactly as signed
/// integers, so every ISA agrees to float rounding.
pub fn matmul(pool: &ThreadPool, isa: Isa, w: &Weights, x: &[f32], xq: &QuantizedActs, n: usize, out: &mut [f32]) {
    let rows = w.rows();
    assert!(out.len() >= n * rows);
    match w {
        Weights::Dense { cols, data, .. } => {
            let cols = *cols;
            assert!(x.len() >= n * cols);
            let o = SyncPtr::new(out);
            pool.run(|tid, nt| {
                for r in split_range(rows, tid, nt, 4) {
                    let wr = &data[r * cols..(r + 1) * cols];
                    for t in 0..n {
                        let v = dot_f32(&x[t * cols..(t + 1) * cols], wr);
                        // SAFETY: rows are split between threads.
                        unsafe { o.write(t * rows + r, v) };
                    }
                }
            });
        }
        Weights::Packed(p) => {
            assert_eq!(xq.n, n);
            assert_eq!(xq.cols, p.cols);
            let o = SyncPtr::new(out);
            pool.run(|tid, nt| {
                let r = split_range(rows, tid, nt, 4);
                // SAFETY: each thread writes only its own rows of `out`.
                unsafe { matmul_rows(isa, p, xq, r, o) };
            });
        }
    }
}

/// Computes rows `rr` for all tokens.
///
/// # Safety
/// `out` has room for `xq.n * p.rows` floats and no other thread writes rows `rr`.
unsafe fn matmul_rows(isa: Isa, p: &PackedMatrix, xq: &QuantizedActs, rr: std::ops::Range<usize>, out: SyncPtr<f32>) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512Vnni => return unsafe { crate::x86::matmul_rows_avx512(p, xq, rr, out) },
        Isa::Avx2 => return unsafe { crate::x86::matmul_rows_avx2(p, xq, rr, out) },
        Isa::Scalar => {}
    }
    let _ = isa;
    for r in rr {
        for t in 0..xq.n {
            unsafe { out.write(t * p.rows + r, dot_scalar(p, r, xq, t)) };
        }
    }
}

/// The reference dot product of packed row `r` with quantized token `t`:
/// per block `d_w * d_x * sum((u - zero) * q_x) + m_w * s_x`.
pub fn dot_scalar(p: &PackedMatrix, r: usize, xq: &QuantizedActs, t: usize) -> f32 {
    let rb = p.row_bytes();
    let wq = &p.qs[r * rb..(r + 1) * rb];
    let xs = &xq.qs[t * xq.nbp * QK..(t + 1) * xq.nbp * QK];
    let mut acc = 0f32;
    for b in 0..p.nbp {
        let mut sum = 0i32;
        for j in 0..QK {
            let w = p.bits.code(wq, b, j) as i32 - p.zero as i32;
            sum += w * xs[b * QK + j] as i32;
        }
        acc += p.d[r * p.nbp + b] * xq.d[t * xq.nbp + b] * sum as f32;
        if let Some(m) = &p.m {
            acc += m[r * p.nbp + b] * xq.s[t * xq.nbp + b];
        }
    }
    acc
}

/// Plain f32 dot product (auto-vectorized).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        for l in 0..16 {
            acc[l] += a[c * 16 + l] * b[c * 16 + l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 16..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::Bits;
    use crate::quant::{GgmlType, SUPPORTED};
    use crate::repack::default_bits;
    use crate::testutil::{tensor, Lcg};

    /// Every ISA this CPU runs (the others are named on stderr) agrees with the float
    /// reference (dequantized weights times dequantized activations) and with the
    /// scalar kernel, for every type in every layout it fits, for odd shapes.
    #[test]
    fn all_isas_match_the_reference() {
        let isas = crate::cpu::testing::isas_for("all_isas_match_the_reference");
        let mut rng = Lcg(42);
        for t in SUPPORTED {
            let shapes: &[(usize, usize, usize)] = if t.block().0 == 256 {
                &[(1, 256, 1), (7, 768, 3), (13, 1280, 5), (64, 1536, 9), (9, 256, 17)]
            } else {
                &[(1, 32, 1), (7, 96, 3), (13, 576, 5), (64, 1536, 9), (9, 64, 17)]
            };
            for &(rows, cols, n) in shapes {
                let bytes = tensor(t, rows, cols, &mut rng);
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f() * 3.0).collect();
                let mut layouts = vec![Weights::from_ggml(t, &bytes, rows, cols).unwrap()];
                for bits in [Bits::Four, Bits::Five, Bits::Eight] {
                    if default_bits(t).is_some_and(|d| d != bits) {
                        layouts.extend(Weights::from_ggml_as(t, &bytes, rows, cols, bits).ok());
                    }
                }
                for w in &layouts {
                    check_every_isa(&isas, t, w, &x, n);
                }
            }
        }
    }

    fn check_every_isa(isas: &[Isa], t: GgmlType, w: &Weights, x: &[f32], n: usize) {
        let (rows, cols) = (w.rows(), w.cols());
        let layout = match w {
            Weights::Packed(p) => format!("{:?}", p.bits),
            Weights::Dense { .. } => "dense".to_string(),
        };
        let mut reference = vec![0f32; n * rows];
        // A strict bound on the activation-quantization error of each output.
        let mut bound = vec![0f32; n * rows];
        let mut wrow = vec![0f32; cols];
        for r in 0..rows {
            w.dequantize_row(r, &mut wrow);
            for tk in 0..n {
                let xt = &x[tk * cols..(tk + 1) * cols];
                reference[tk * rows + r] = dot_f32(xt, &wrow);
                let mut b = 1e-3f32;
                for (blk, wb) in xt.chunks(QK).zip(wrow.chunks(QK)) {
                    let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                    for (xv, wv) in blk.iter().zip(wb) {
                        b += wv.abs() * (amax / 127.0 * 0.51 + xv.abs() * 2e-3);
                    }
                }
                bound[tk * rows + r] = b;
            }
        }
        let mut scalar_out = None;
        for &isa in isas {
            for threads in [1, 2, 3] {
                let pool = ThreadPool::new(threads);
                let mut xq = QuantizedActs::new();
                xq.quantize(&pool, isa, x, n, cols);
                let mut out = vec![f32::NAN; n * rows];
                matmul(&pool, isa, w, x, &xq, n, &mut out);
                for i in 0..n * rows {
                    let tol = if matches!(w, Weights::Dense { .. }) { 1e-3 } else { bound[i] };
                    assert!(
                        (out[i] - reference[i]).abs() <= tol,
                        "{t:?} as {layout} {isa:?} {rows}x{cols} n={n} i={i}: {} vs {}",
                        out[i],
                        reference[i]
                    );
                }
                match &scalar_out {
                    None => scalar_out = Some(out),
                    Some(s) => {
                        for i in 0..n * rows {
                            assert!(
                                (out[i] - s[i]).abs() <= 1e-4 * (1.0 + s[i].abs()),
                                "{t:?} as {layout} {isa:?} differs from scalar at {i}: {} vs {}",
                                out[i],
                                s[i]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn quantizers_agree() {
        let mut rng = Lcg(7);
        let x: Vec<f32> = (0..4 * 576).map(|_| rng.f() * 10.0).collect();
        let pool = ThreadPool::new(2);
        let mut a = QuantizedActs::new();
        a.quantize(&pool, Isa::Scalar, &x, 4, 576);
        for isa in crate::cpu::testing::isas_for("quantizers_agree") {
            let mut b = QuantizedActs::new();
            b.quantize(&pool, isa, &x, 4, 576);
            assert_eq!(a.qs, b.qs, "{isa:?}");
            assert_eq!(a.d, b.d, "{isa:?}");
            assert_eq!(a.s, b.s, "{isa:?}");
            assert_eq!(a.dexp, b.dexp, "{isa:?}");
        }
    }
}
