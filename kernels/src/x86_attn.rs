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
    let mut row = [_mm256_setzero_ps(); AVX2_MAX_HEAD_DIM / 8];
    for pos in 0..n {
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
    out[..group * hd].fill(0.0);
    for pos in 0..n {
        let o = sh.offset(a.block_table[pos / sh.block_size] as usize, a.kv_head, pos % sh.block_size);
        let v = &a.v_cache[o..o + hd];
        for (c, r) in row[..chunks].iter_mut().enumerate() {
            // SAFETY: `v` holds `hd` elements.
            *r = unsafe { load8(v.as_ptr().add(c * 8)) };
        }
        for g in 0..group {
            let p = _mm256_set1_ps(scores[g * n + pos]);
            let dst = &mut out[g * hd..(g + 1) * hd];
            for (c, r) in row[..chunks].iter().enumerate() {
                // SAFETY: `dst` holds `hd` floats.
                unsafe {
                    let d = dst.as_mut_ptr().add(c * 8);
                    // Multiply, then add, as the reference does per element.
                    _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), _mm256_mul_ps(p, *r)));
                }
            }
        }
    }
}
