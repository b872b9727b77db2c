//! x86-64 SIMD kernels (AVX2 and AVX-512 VNNI), selected at run time by `Isa`.
//!
//! Every function here has a scalar twin elsewhere in the crate that the tests
//! compare it against; callers check the CPU before calling (see `cpu.rs`).

// Register tiles are indexed by row and token, as the arithmetic reads.
#![allow(clippy::missing_safety_doc, clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::matmul::QuantizedActs;
use crate::packed::{Bits, PackedMatrix};
use crate::pool::SyncPtr;
use crate::quant::QK;

/// AVX-512 version of `quantize_row_scalar`; bit-identical results.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_row_avx512(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    let nb = x.len() / QK;
    assert!(qs.len() >= nb * QK && d.len() >= nb && s.len() >= nb);
    for b in 0..nb {
        let p = unsafe { x.as_ptr().add(b * QK) };
        let a = unsafe { _mm512_loadu_ps(p) };
        let c = unsafe { _mm512_loadu_ps(p.add(16)) };
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
        let scale = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let vinv = _mm512_set1_ps(inv);
        let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vinv));
        let qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, vinv));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
        unsafe {
            let out = qs.as_mut_ptr().add(b * QK) as *mut __m128i;
            _mm_storeu_si128(out, _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128(out.add(1), _mm512_cvtepi32_epi8(qc));
        }
        let dr = half::f16::from_f32(scale).to_f32();
        d[b] = dr;
        s[b] = dr * sum as f32;
    }
}

/// `sum_i a[i] * b[i]` over `n` floats.
#[target_feature(enable = "avx512f")]
unsafe fn dot_f32_avx512(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        acc = unsafe { _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), acc) };
        i += 16;
    }
    if i < n {
        let k: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        acc = unsafe { _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a.add(i)), _mm512_maskz_loadu_ps(k, b.add(i)), acc) };
    }
    _mm512_reduce_add_ps(acc)
}

/// Rows `rr` of `p` times every token of `xq`, with VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn matmul_rows_avx512(p: &PackedMatrix, xq: &QuantizedActs, rr: std::ops::Range<usize>, out: SyncPtr<f32>) {
    unsafe {
        match (p.bits, p.zero != 0) {
            (Bits::Four, false) => rows_avx512::<4, false>(p, xq, rr, out),
            (Bits::Four, true) => rows_avx512::<4, true>(p, xq, rr, out),
            (Bits::Five, false) => rows_avx512::<5, false>(p, xq, rr, out),
            (Bits::Five, true) => rows_avx512::<5, true>(p, xq, rr, out),
            (Bits::Eight, _) => rows_avx512::<8, true>(p, xq, rr, out),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_avx512<const BITS: u32, const CENTRED: bool>(
    p: &PackedMatrix,
    xq: &QuantizedActs,
    rr: std::ops::Range<usize>,
    out: SyncPtr<f32>,
) {
    let n = xq.n;
    let mut r = rr.start;
    unsafe {
        while r + 4 <= rr.end {
            let mut t = 0;
            while t + 4 <= n {
                tile_avx512::<BITS, CENTRED, 4, 4>(p, xq, r, t, out);
                t += 4;
            }
            while t < n {
                tile_avx512::<BITS, CENTRED, 4, 1>(p, xq, r, t, out);
                t += 1;
            }
            r += 4;
        }
        while r < rr.end {
            let mut t = 0;
            while t + 4 <= n {
                tile_avx512::<BITS, CENTRED, 1, 4>(p, xq, r, t, out);
                t += 4;
            }
            while t < n {
                tile_avx512::<BITS, CENTRED, 1, 1>(p, xq, r, t, out);
                t += 1;
            }
            r += 1;
        }
    }
}

/// An `R` rows by `T` tokens tile: weights are expanded once per pair of
/// blocks (64 byte lanes: the even block, then the odd one) and applied to `T`
/// tokens from registers. `BITS` is the layout's width; `CENTRED` says the zero
/// point is not 0.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_avx512<const BITS: u32, const CENTRED: bool, const R: usize, const T: usize>(
    p: &PackedMatrix,
    xq: &QuantizedActs,
    r0: usize,
    t0: usize,
    out: SyncPtr<f32>,
) {
    let nbp = p.nbp;
    let rb = p.row_bytes();
    let pb = p.bits.pair_bytes();
    let npairs = nbp / 2;
    let mask = _mm512_set1_epi8(0x0f);
    let sixteen = _mm512_set1_epi8(16);
    let shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    let zero = _mm512_set1_epi8(p.zero as i8);
    let pair_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let wq = p.qs.as_ptr();
    let wd = p.d.as_ptr();
    let xqs = xq.qs.as_ptr();
    let xdx = xq.dexp.as_ptr();
    unsafe {
        for pi in 0..npairs {
            let mut w = [_mm512_setzero_si512(); R];
            let mut dw = [_mm512_setzero_ps(); R];
            for i in 0..R {
                let row = r0 + i;
                let base = wq.add(row * rb + pi * pb);
                // The next tile's weights at this column: the hardware prefetchers stop at
                // 4 KiB pages and over short rows (896 columns) batch-1 ran ~25% slower
                // without this. A hint: past the matrix's end it is harmless.
                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(R * rb) as *const i8);
                w[i] = if BITS == 8 {
                    _mm512_loadu_si512(base as *const __m512i)
                } else {
                    let v = _mm512_broadcast_i64x4(_mm256_loadu_si256(base as *const __m256i));
                    let low = _mm512_and_si512(_mm512_srlv_epi16(v, shifts), mask);
                    if BITS == 5 {
                        // The fifth bits are the byte mask of the lanes that gain 16.
                        let high: __mmask64 = (base.add(QK) as *const u64).read_unaligned();
                        _mm512_mask_add_epi8(low, high, low, sixteen)
                    } else {
                        low
                    }
                };
                let d2 = _mm_castsi128_ps(_mm_loadl_epi64(wd.add(row * nbp + 2 * pi) as *const __m128i));
                dw[i] = _mm512_permutexvar_ps(pair_idx, _mm512_castps128_ps512(d2));
            }
            for j in 0..T {
                let tok = t0 + j;
                let x = _mm512_loadu_si512(xqs.add(tok * nbp * QK + pi * 64) as *const __m512i);
                let dx = _mm512_loadu_ps(xdx.add(tok * nbp * 8 + pi * 16));
                // Starting each lane at -zero * (its four activations' sum) makes
                // the integer sum exactly (u - zero) . x.
                let init = if CENTRED {
                    _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), zero, x))
                } else {
                    _mm512_setzero_si512()
                };
                for i in 0..R {
                    let s = _mm512_dpbusd_epi32(init, w[i], x);
                    acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw[i], dx), acc[i][j]);
                }
            }
        }
        for j in 0..T {
            let tok = t0 + j;
            let mut sums = [0f32; R];
            if R == 4 {
                let four = hsum4_avx512(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
                _mm_storeu_ps(sums.as_mut_ptr(), four);
            } else {
                for i in 0..R {
                    sums[i] = _mm512_reduce_add_ps(acc[i][j]);
                }
            }
            for (i, sum) in sums.into_iter().enumerate() {
                let row = r0 + i;
                let ms = match &p.m {
                    Some(m) => dot_f32_avx512(m.as_ptr().add(row * nbp), xq.s.as_ptr().add(tok * nbp), nbp),
                    None => 0.0,
                };
                out.write(tok * p.rows + row, sum + ms);
            }
        }
    }
}

/// The lane sums of four vectors, in order (a shared reduction tree: about a
/// third of the instructions of four separate ones, which matters for short rows).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn hsum4_avx512(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], likewise for c and d.
    let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    // Per 128-bit lane: [a, b, c, d] partial sums.
    let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
    let abcd =
        _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)), _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)));
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(abcd)));
    let half = _mm256_add_ps(_mm512_castps512_ps256(abcd), high);
    _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps::<1>(half))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// 32 bytes, each 16 where its bit of `bits` is set and 0 elsewhere.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn fifth_bits_avx2(bits: u32) -> __m256i {
    // Byte j takes byte j / 8 of the word (in both 128-bit lanes), then tests bit j % 8.
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let select = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select);
    _mm256_and_si256(set, _mm256_set1_epi8(16))
}

/// Rows `rr` of `p` times every token of `xq`, with AVX2 (`vpmaddubsw`).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn matmul_rows_avx2(p: &PackedMatrix, xq: &QuantizedActs, rr: std::ops::Range<usize>, out: SyncPtr<f32>) {
    unsafe {
        match (p.bits, p.zero != 0) {
            (Bits::Four, false) => rows_avx2::<4, false>(p, xq, rr, out),
            (Bits::Four, true) => rows_avx2::<4, true>(p, xq, rr, out),
            (Bits::Five, false) => rows_avx2::<5, false>(p, xq, rr, out),
            (Bits::Five, true) => rows_avx2::<5, true>(p, xq, rr, out),
            (Bits::Eight, _) => rows_avx2::<8, true>(p, xq, rr, out),
        }
    }
}

/// One row and token at a time. Centred codes are made signed (u - zero) and
/// summed with the sign trick, |w| * (x * sign w), which no 8-bit weight can
/// saturate; uncentred ones (at most 31) multiply x directly.
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<const BITS: u32, const CENTRED: bool>(
    p: &PackedMatrix,
    xq: &QuantizedActs,
    rr: std::ops::Range<usize>,
    out: SyncPtr<f32>,
) {
    let nbp = p.nbp;
    let rb = p.row_bytes();
    let pb = p.bits.pair_bytes();
    let mask = _mm256_set1_epi8(0x0f);
    let zero = _mm256_set1_epi8(p.zero as i8);
    let ones = _mm256_set1_epi16(1);
    unsafe {
        for row in rr {
            let wrow = p.qs.as_ptr().add(row * rb);
            let wd = p.d.as_ptr().add(row * nbp);
            for tok in 0..xq.n {
                let xs = xq.qs.as_ptr().add(tok * nbp * QK);
                let xd = xq.d.as_ptr().add(tok * nbp);
                let mut acc = _mm256_setzero_ps();
                for pi in 0..nbp / 2 {
                    let base = wrow.add(pi * pb);
                    let halves = if BITS == 8 {
                        [_mm256_loadu_si256(base as *const __m256i), _mm256_loadu_si256(base.add(QK) as *const __m256i)]
                    } else {
                        let v = _mm256_loadu_si256(base as *const __m256i);
                        let low = [_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask)];
                        if BITS == 5 {
                            let high = (base.add(QK) as *const u64).read_unaligned();
                            [
                                _mm256_or_si256(low[0], fifth_bits_avx2(high as u32)),
                                _mm256_or_si256(low[1], fifth_bits_avx2((high >> 32) as u32)),
                            ]
                        } else {
                            low
                        }
                    };
                    for (h, u) in halves.into_iter().enumerate() {
                        let b = 2 * pi + h;
                        let x = _mm256_loadu_si256(xs.add(b * QK) as *const __m256i);
                        let prod = if CENTRED {
                            let w = _mm256_sub_epi8(u, zero);
                            _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w))
                        } else {
                            _mm256_maddubs_epi16(u, x)
                        };
                        let s = _mm256_madd_epi16(prod, ones);
                        let scale = _mm256_set1_ps(*wd.add(b) * *xd.add(b));
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);
                    }
                }
                let mut tail = 0f32;
                if let Some(m) = &p.m {
                    for b in 0..nbp {
                        tail += m[row * nbp + b] * xq.s[tok * nbp + b];
                    }
                }
                out.write(tok * p.rows + row, hsum256(acc) + tail);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_horizontal_sums_at_once() {
        if !crate::cpu::testing::has_avx512f("four_horizontal_sums_at_once") {
            return;
        }
        let v: Vec<f32> = (0..64).map(|i| (i * i % 37) as f32 - 9.0).collect();
        let mut got = [0f32; 4];
        // SAFETY: the CPU has AVX-512F.
        unsafe {
            let l = |k: usize| _mm512_loadu_ps(v.as_ptr().add(16 * k));
            _mm_storeu_ps(got.as_mut_ptr(), hsum4_avx512(l(0), l(1), l(2), l(3)));
        }
        let want: Vec<f32> = v.chunks(16).map(|c| c.iter().sum()).collect();
        assert_eq!(got.to_vec(), want);
    }
}
