//! AVX-512 and AVX2 paged attention, and the vector exponential AVX-512 needs.

use std::arch::x86_64::*;

use crate::attention::{attend_scalar, softmax_in_place, AttendArgs, KvElem};

/// `e^x`, to about one ulp over the range softmax and SiLU use.
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn exp512(x: __m512) -> __m512 {
    let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0)), _mm512_set1_ps(-87.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 120.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 24.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 6.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    _mm512_scalef_ps(p, n)
}

#[inline]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn load16<E: KvElem>(p: *const E) -> __m512 {
    unsafe {
        if E::IS_F16 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }
}

#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn attend_avx512<E: KvElem>(a: &AttendArgs<'_, E>, out: &mut [f32], scores: &mut [f32]) {
    let hd = a.shape.head_dim;
    let group = a.q.len() / hd;
    // Query heads sharing this KV head go through in chunks of up to four: each K and V row
    // is converted once per chunk and used by every head in it, from registers.
    let mut h = 0;
    while h < group {
        let g = (group - h).min(4);
        let sub = AttendArgs { q: &a.q[h * hd..(h + g) * hd], ..*a };
        let o = &mut out[h * hd..(h + g) * hd];
        unsafe {
            match (hd / 16, g) {
                (1, 1) => attend_grouped::<E, 1, 1>(&sub, o, scores),
                (1, 2) => attend_grouped::<E, 1, 2>(&sub, o, scores),
                (1, 3) => attend_grouped::<E, 1, 3>(&sub, o, scores),
                (1, _) => attend_grouped::<E, 1, 4>(&sub, o, scores),
                (2, 1) => attend_grouped::<E, 2, 1>(&sub, o, scores),
                (2, 2) => attend_grouped::<E, 2, 2>(&sub, o, scores),
                (2, 3) => attend_grouped::<E, 2, 3>(&sub, o, scores),
                (2, _) => attend_grouped::<E, 2, 4>(&sub, o, scores),
                (4, 1) => attend_grouped::<E, 4, 1>(&sub, o, scores),
                (4, 2) => attend_grouped::<E, 4, 2>(&sub, o, scores),
                (4, 3) => attend_grouped::<E, 4, 3>(&sub, o, scores),
                (4, _) => attend_grouped::<E, 4, 4>(&sub, o, scores),
                (8, 1) => attend_grouped::<E, 8, 1>(&sub, o, scores),
                (8, 2) => attend_grouped::<E, 8, 2>(&sub, o, scores),
                (8, 3) => attend_grouped::<E, 8, 3>(&sub, o, scores),
                (8, _) => attend_grouped::<E, 8, 4>(&sub, o, scores),
                _ => attend_scalar(&sub, o, scores),
            }
        }
        h += g;
    }
}

/// `G` query heads of `NV * 16` dimensions against one KV head.
#[target_feature(enable = "avx512f,f16c")]
unsafe fn attend_grouped<E: KvElem, const NV: usize, const G: usize>(
    a: &AttendArgs<'_, E>,
    out: &mut [f32],
    scores: &mut [f32],
) {
    let sh = a.shape;
    let hd = sh.head_dim;
    let n = a.ctx_len;
    let bs = sh.block_size;
    let n_blocks = n.div_ceil(bs);
    let scale = _mm512_set1_ps(a.scale);
    // Bounds: every block the table names must lie inside both caches.
    for &b in &a.block_table[..n_blocks] {
        let end = sh.offset(b as usize, a.kv_head, bs - 1) + hd;
        assert!(end <= a.k_cache.len() && end <= a.v_cache.len(), "block {b} outside the cache");
    }
    assert!(scores.len() >= G * n && out.len() >= G * hd);
    unsafe {
        // Scores: every head's q . k, one K row converted once for all G heads.
        let mut q = [[_mm512_setzero_ps(); NV]; G];
        for (g, qg) in q.iter_mut().enumerate() {
            for (c, qv) in qg.iter_mut().enumerate() {
                *qv = _mm512_mul_ps(_mm512_loadu_ps(a.q.as_ptr().add(g * hd + c * 16)), scale);
            }
        }
        let sp = scores.as_mut_ptr();
        for bi in 0..n_blocks {
            let base = a.k_cache.as_ptr().add(sh.offset(a.block_table[bi] as usize, a.kv_head, 0));
            for s in 0..bs.min(n - bi * bs) {
                let kp = base.add(s * hd);
                let mut k = [_mm512_setzero_ps(); NV];
                for (c, kv) in k.iter_mut().enumerate() {
                    *kv = load16(kp.add(c * 16));
                }
                for (g, qg) in q.iter().enumerate() {
                    let mut acc = _mm512_mul_ps(qg[0], k[0]);
                    for c in 1..NV {
                        acc = _mm512_fmadd_ps(qg[c], k[c], acc);
                    }
                    *sp.add(g * n + bi * bs + s) = _mm512_reduce_add_ps(acc);
                }
            }
        }
        for g in 0..G {
            softmax512(std::slice::from_raw_parts_mut(sp.add(g * n), n));
        }
        // Output: probability-weighted sum of V rows, one V row converted once for all G heads.
        let mut acc = [[_mm512_setzero_ps(); NV]; G];
        for bi in 0..n_blocks {
            let base = a.v_cache.as_ptr().add(sh.offset(a.block_table[bi] as usize, a.kv_head, 0));
            for s in 0..bs.min(n - bi * bs) {
                let vp = base.add(s * hd);
                let mut v = [_mm512_setzero_ps(); NV];
                for (c, vv) in v.iter_mut().enumerate() {
                    *vv = load16(vp.add(c * 16));
                }
                for (g, ag) in acc.iter_mut().enumerate() {
                    let p = _mm512_set1_ps(*sp.add(g * n + bi * bs + s));
                    for c in 0..NV {
                        ag[c] = _mm512_fmadd_ps(p, v[c], ag[c]);
                    }
                }
            }
        }
        for (g, ag) in acc.iter().enumerate() {
            for (c, av) in ag.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(g * hd + c * 16), *av);
            }
        }
    }
}

/// Softmax of a row in place.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax512(x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    let tail = n % 16;
    let full = n - tail;
    let tmask: __mmask16 = ((1u32 << tail) - 1) as u16;
    unsafe {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < full {
            m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
            i += 16;
        }
        if tail > 0 {
            m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tmask, p.add(full)));
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        let mut sum = _mm512_setzero_ps();
        i = 0;
        while i < full {
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max));
            _mm512_storeu_ps(p.add(i), e);
            sum = _mm512_add_ps(sum, e);
            i += 16;
        }
        if tail > 0 {
            let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tmask, p.add(full)), max));
            let e = _mm512_maskz_mov_ps(tmask, e);
            _mm512_mask_storeu_ps(p.add(full), tmask, e);
            sum = _mm512_add_ps(sum, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        i = 0;
        while i < full {
            _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
            i += 16;
        }
        if tail > 0 {
            _mm512_mask_storeu_ps(p.add(full), tmask, _mm512_mul_ps(_mm512_maskz_loadu_ps(tmask, p.add(full)), inv));
        }
    }
}

/// `gate = silu(gate) * up`.
#[target_feature(enable = "avx512f")]
pub unsafe fn swiglu512(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let full = n - n % 16;
    let one = _mm512_set1_ps(1.0);
    unsafe {
        let mut i = 0;
        while i < full {
            let g = _mm512_loadu_ps(gate.as_ptr().add(i));
            let u = _mm512_loadu_ps(up.as_ptr().add(i));
            let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
            _mm512_storeu_ps(gate.as_mut_ptr().add(i), _mm512_mul_ps(silu, u));
            i += 16;
        }
    }
    crate::ops::swiglu(&mut gate[full..n], &up[full..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu::testing::has_avx512f;

    /// Needs AVX-512F; on a CPU without it, says so on stderr and passes.
    #[test]
    fn exp_is_accurate() {
        if !has_avx512f("exp_is_accurate") {
            return;
        }
        let mut x = -80.0f32;
        while x < 80.0 {
            let mut buf = [0f32; 16];
            unsafe { _mm512_storeu_ps(buf.as_mut_ptr(), exp512(_mm512_set1_ps(x))) };
            let want = x.exp();
            assert!(((buf[0] - want) / want).abs() < 3e-7, "exp({x}) = {} vs {want}", buf[0]);
            x += 0.0137;
        }
    }

    /// Needs AVX-512F; on a CPU without it, says so on stderr and passes.
    #[test]
    fn swiglu_matches_scalar() {
        if !has_avx512f("swiglu_matches_scalar") {
            return;
        }
        let mut g: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.7).collect();
        let u: Vec<f32> = (0..37).map(|i| (i as f32) * 0.1 - 1.0).collect();
        let mut want = g.clone();
        crate::ops::swiglu(&mut want, &u);
        unsafe { swiglu512(&mut g, &u) };
        for i in 0..37 {
            assert!((g[i] - want[i]).abs() <= 1e-6 * (1.0 + want[i].abs()), "{i}");
        }
    }
}

/// The largest head the AVX2 path takes (its K or V row is held in registers' worth of stack).
pub const AVX2_MAX_HEAD_DIM: usize = 256;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<E: KvElem>(p: *const E) -> __m256 {
    unsafe {
        if E::IS_F16 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }
}

/// Transposes eight rows of eight floats in place: lane `j` of row `i` becomes lane `i` of row `j`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transpose8(r: &mut [__m256; 8]) {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    r[0] = _mm256_permute2f128_ps::<0x20>(s0, s4);
    r[1] = _mm256_permute2f128_ps::<0x20>(s1, s5);
    r[2] = _mm256_permute2f128_ps::<0x20>(s2, s6);
    r[3] = _mm256_permute2f128_ps::<0x20>(s3, s7);
    r[4] = _mm256_permute2f128_ps::<0x31>(s0, s4);
    r[5] = _mm256_permute2f128_ps::<0x31>(s1, s5);
    r[6] = _mm256_permute2f128_ps::<0x31>(s2, s6);
    r[7] = _mm256_permute2f128_ps::<0x31>(s3, s7);
}

/// The scores of query heads `g0..g0 + N` against the eight positions from `pos`, whose
/// K rows `kt` holds transposed (entry `d`: dimension `d` of the eight). Each lane sums in
/// the reference's order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_dots<const N: usize>(
    kt: &[__m256],
    q: &[f32],
    g0: usize,
    scale: f32,
    scores: &mut [f32],
    n: usize,
    pos: usize,
) {
    let hd = kt.len();
    let qs: [&[f32]; N] = std::array::from_fn(|j| &q[(g0 + j) * hd..(g0 + j + 1) * hd]);
    let mut acc = [_mm256_setzero_ps(); N];
    for (d, &k) in kt.iter().enumerate() {
        for j in 0..N {
            acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(_mm256_set1_ps(qs[j][d]), k));
        }
    }
    let s = _mm256_set1_ps(scale);
    for (j, acc) in acc.iter().enumerate() {
        let dst = &mut scores[(g0 + j) * n + pos..(g0 + j) * n + pos + 8];
        // SAFETY: `dst` holds eight floats.
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), _mm256_mul_ps(*acc, s)) };
    }
}

/// `dst`'s chunks `c0..c0 + C` (eight dimensions each): the sum over positions of each
/// position's weight times its V row, in position order. Returns `C`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_values<E: KvElem, const C: usize>(
    a: &AttendArgs<'_, E>,
    weights: &[f32],
    dst: &mut [f32],
    c0: usize,
) -> usize {
    let sh = a.shape;
    let mut acc = [_mm256_setzero_ps(); C];
    for (pos, &w) in weights.iter().enumerate() {
        let o = sh.offset(a.block_table[pos / sh.block_size] as usize, a.kv_head, pos % sh.block_size) + c0 * 8;
        let v = &a.v_cache[o..o + C * 8];
        let w = _mm256_set1_ps(w);
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: `v` holds `8 * C` elements. Multiply, then add, as the reference does.
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(w, unsafe { load8(v.as_ptr().add(j * 8)) }));
        }
    }
    for (j, acc) in acc.iter().enumerate() {
        let d = &mut dst[(c0 + j) * 8..(c0 + j + 1) * 8];
        // SAFETY: `d` holds eight floats.
        unsafe { _mm256_storeu_ps(d.as_mut_ptr(), *acc) };
    }
    C
}

/// AVX2 + F16C: each K and V row is converted to f32 once and used by every query head of
/// the group; the softmax is the scalar one (its cost is per position, not per dimension).
/// Every output is computed in the reference's order of operations, so it equals
/// [`attend_scalar`]'s exactly. `head_dim` is a multiple of 8, at most [`AVX2_MAX_HEAD_DIM`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attend_avx2<E: KvElem>(a: &AttendArgs<'_, E>, out: &mut [f32], scores: &mut [f32]) {
    let sh = a.shape;
    let hd = sh.head_dim;
    let group = a.q.len() / hd;
    let n = a.ctx_len;
    if !hd.is_multiple_of(8) || hd > AVX2_MAX_HEAD_DIM {
        return attend_scalar(a, out, scores);
    }
    let chunks = hd / 8;
    // Scores, eight positions at a time: their K rows transposed so that each lane is one
    // position and runs the reference's dot product (multiply, then add, dimension by
    // dimension in order). The lanes are independent, so the sums need no reordering,
    // and the query heads of the group are independent chains the core overlaps.
    let tiles = n / 8;
    let mut kt = [_mm256_setzero_ps(); AVX2_MAX_HEAD_DIM];
    for tile in 0..tiles {
        let pos = tile * 8;
        let rows: [&[E]; 8] = std::array::from_fn(|i| {
            let p = pos + i;
            let o = sh.offset(a.block_table[p / sh.block_size] as usize, a.kv_head, p % sh.block_size);
            &a.k_cache[o..o + hd]
        });
        for c in 0..chunks {
            // SAFETY: every row holds `hd` = 8 * chunks elements.
            let mut r: [__m256; 8] = std::array::from_fn(|i| unsafe { load8(rows[i].as_ptr().add(c * 8)) });
            unsafe { transpose8(&mut r) };
            kt[c * 8..c * 8 + 8].copy_from_slice(&r);
        }
        let mut g = 0;
        while g < group {
            // SAFETY: the same target features as this function.
            unsafe {
                match group - g {
                    1 => tile_dots::<1>(&kt[..hd], a.q, g, a.scale, scores, n, pos),
                    2 => tile_dots::<2>(&kt[..hd], a.q, g, a.scale, scores, n, pos),
                    3 => tile_dots::<3>(&kt[..hd], a.q, g, a.scale, scores, n, pos),
                    _ => tile_dots::<4>(&kt[..hd], a.q, g, a.scale, scores, n, pos),
                }
            }
            g += 4;
        }
    }
    let mut row = [_mm256_setzero_ps(); AVX2_MAX_HEAD_DIM / 8];
    for pos in tiles * 8..n {
        let o = sh.offset(a.block_table[pos / sh.block_size] as usize, a.kv_head, pos % sh.block_size);
        let k = &a.k_cache[o..o + hd];
        for (c, r) in row[..chunks].iter_mut().enumerate() {
            // SAFETY: `k` holds `hd` = 8 * chunks elements.
            *r = unsafe { load8(k.as_ptr().add(c * 8)) };
        }
        for g in 0..group {
            let q = &a.q[g * hd..(g + 1) * hd];
            // The products vectorised, their sum in the scalar path's order: the result is
            // bit for bit the reference's (Rust never fuses the scalar multiply and add), so
            // greedy output does not move with the ISA.
            let mut dot = 0f32;
            let mut prod = [0f32; 8];
            for (c, r) in row[..chunks].iter().enumerate() {
                // SAFETY: `q` holds `hd` floats.
                unsafe {
                    _mm256_storeu_ps(prod.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(q.as_ptr().add(c * 8)), *r))
                };
                for x in prod {
                    dot += x;
                }
            }
            scores[g * n + pos] = dot * a.scale;
        }
    }
    for g in 0..group {
        softmax_in_place(&mut scores[g * n..(g + 1) * n]);
    }
    // Values: each query head's output, a few chunks of dimensions at a time, summed over
    // the positions in order in registers (the reference's order, lane by lane).
    for g in 0..group {
        let weights = &scores[g * n..(g + 1) * n];
        let dst = &mut out[g * hd..(g + 1) * hd];
        let mut c0 = 0;
        while c0 < chunks {
            // SAFETY: the same target features as this function.
            c0 += unsafe {
                match chunks - c0 {
                    8.. => weighted_values::<E, 8>(a, weights, dst, c0),
                    4..=7 => weighted_values::<E, 4>(a, weights, dst, c0),
                    2 | 3 => weighted_values::<E, 2>(a, weights, dst, c0),
                    _ => weighted_values::<E, 1>(a, weights, dst, c0),
                }
            };
        }
    }
}
