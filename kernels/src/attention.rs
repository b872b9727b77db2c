//! Paged KV cache writes and paged attention.
//!
//! One layer's K (or V) cache is a flat slice of blocks; a block holds
//! `block_size` token slots for every KV head, laid out
//! `[block][kv_head][slot][head_dim]`, so one head's keys in a block are
//! contiguous and one block of one layer is one contiguous range (what the KV
//! transfer sends). A sequence reaches its tokens only through its block
//! table: position `p` lives in block `table[p / block_size]`, slot
//! `p % block_size`. No contiguous per-sequence buffer exists.

use half::f16;

use crate::cpu::Isa;

/// The shape of one layer's paged cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Elements one block takes in one layer's K (or V) cache.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.n_kv_heads * self.head_dim
    }

    /// Offset of `(block, head, slot)` in a layer's cache.
    #[inline]
    pub fn offset(&self, block: usize, head: usize, slot: usize) -> usize {
        ((block * self.n_kv_heads + head) * self.block_size + slot) * self.head_dim
    }
}

/// An element type the cache can store.
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// True for `f16` (selects the SIMD conversion path).
    const IS_F16: bool;
}

impl KvElem for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    const IS_F16: bool = false;
}

impl KvElem for f16 {
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    const IS_F16: bool = true;
}

/// Stores one token's K and V (`n_kv_heads * head_dim` each) into `slot` of `block`.
pub fn write_kv<E: KvElem>(
    shape: KvShape,
    k_cache: &mut [E],
    v_cache: &mut [E],
    block: usize,
    slot: usize,
    k: &[f32],
    v: &[f32],
) {
    let hd = shape.head_dim;
    for h in 0..shape.n_kv_heads {
        let o = shape.offset(block, h, slot);
        for (dst, &src) in k_cache[o..o + hd].iter_mut().zip(&k[h * hd..(h + 1) * hd]) {
            *dst = E::from_f32(src);
        }
        for (dst, &src) in v_cache[o..o + hd].iter_mut().zip(&v[h * hd..(h + 1) * hd]) {
            *dst = E::from_f32(src);
        }
    }
}

/// One query token's attention for the query heads that share KV head `kv_head`.
#[derive(Debug)]
pub struct AttendArgs<'a, E> {
    pub shape: KvShape,
    /// `group * head_dim` query values (already rotated).
    pub q: &'a [f32],
    pub k_cache: &'a [E],
    pub v_cache: &'a [E],
    pub kv_head: usize,
    pub block_table: &'a [u32],
    /// Attend to positions `0..ctx_len` (causal: the query's own position is `ctx_len - 1`).
    pub ctx_len: usize,
    pub scale: f32,
}

/// Writes `group * head_dim` outputs; `scores` is scratch of at least `group * ctx_len`.
pub fn attend<E: KvElem>(isa: Isa, a: &AttendArgs<'_, E>, out: &mut [f32], scores: &mut [f32]) {
    let hd = a.shape.head_dim;
    let group = a.q.len() / hd;
    assert!(a.ctx_len > 0 && a.ctx_len <= a.block_table.len() * a.shape.block_size);
    assert!(scores.len() >= group * a.ctx_len && out.len() >= group * hd);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && hd.is_multiple_of(16) {
        // SAFETY: the ISA was detected; bounds were checked above and per block below.
        unsafe { crate::x86_attn::attend_avx512(a, out, scores) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512Vnni) && hd.is_multiple_of(8) && hd <= crate::x86_attn::AVX2_MAX_HEAD_DIM {
        // SAFETY: AVX2, FMA and F16C were detected (both ISAs include them); bounds as above.
        unsafe { crate::x86_attn::attend_avx2(a, out, scores) };
        return;
    }
    let _ = isa;
    attend_scalar(a, out, scores)
}

/// The reference implementation.
pub fn attend_scalar<E: KvElem>(a: &AttendArgs<'_, E>, out: &mut [f32], scores: &mut [f32]) {
    let sh = a.shape;
    let hd = sh.head_dim;
    let group = a.q.len() / hd;
    let n = a.ctx_len;
    for pos in 0..n {
        let o = sh.offset(a.block_table[pos / sh.block_size] as usize, a.kv_head, pos % sh.block_size);
        let k = &a.k_cache[o..o + hd];
        for g in 0..group {
            let q = &a.q[g * hd..(g + 1) * hd];
            let mut dot = 0f32;
            for i in 0..hd {
                dot += q[i] * k[i].to_f32();
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
        for g in 0..group {
            let p = scores[g * n + pos];
            for i in 0..hd {
                out[g * hd + i] += p * v[i].to_f32();
            }
        }
    }
}

/// Numerically stable softmax.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Attention through a scrambled block table equals attention over a plain
    /// contiguous copy, on every ISA this CPU runs (the others are named on stderr) and
    /// both element types.
    fn check<E: KvElem + std::fmt::Debug>(test: &str) {
        let isas = crate::cpu::testing::isas_for(test);
        let isas: Vec<Isa> = isas.into_iter().collect();
        for hd in [32usize, 64] {
            check_shape::<E>(&isas, hd);
        }
    }

    fn check_shape<E: KvElem + std::fmt::Debug>(isas: &[Isa], hd: usize) {
        let shape = KvShape { block_size: 4, n_kv_heads: 2, head_dim: hd };
        let n_blocks = 8;
        let mut seed = 3u64;
        let mut kc = vec![E::default(); n_blocks * shape.block_elems()];
        let mut vc = kc.clone();
        let table: Vec<u32> = vec![5, 2, 7, 0, 3];
        let ctx = 18;
        let mut ks = vec![];
        let mut vs = vec![];
        for pos in 0..ctx {
            let k: Vec<f32> = (0..2 * hd).map(|_| rnd(&mut seed)).collect();
            let v: Vec<f32> = (0..2 * hd).map(|_| rnd(&mut seed)).collect();
            write_kv(shape, &mut kc, &mut vc, table[pos / 4] as usize, pos % 4, &k, &v);
            ks.push(k);
            vs.push(v);
        }
        // Group sizes that exercise the SIMD path's chunks of up to four query heads.
        for group in [1, 2, 3, 5, 7] {
            let q: Vec<f32> = (0..group * hd).map(|_| rnd(&mut seed) * 2.0).collect();
            for head in 0..2 {
                // Plain reference over the rounded-through-E values.
                let mut want = vec![0f32; group * hd];
                for g in 0..group {
                    let mut s: Vec<f32> = (0..ctx)
                        .map(|p| {
                            (0..hd).map(|i| q[g * hd + i] * E::from_f32(ks[p][head * hd + i]).to_f32()).sum::<f32>()
                                * 0.2
                        })
                        .collect();
                    softmax_in_place(&mut s);
                    for p in 0..ctx {
                        for i in 0..hd {
                            want[g * hd + i] += s[p] * E::from_f32(vs[p][head * hd + i]).to_f32();
                        }
                    }
                }
                for &isa in isas {
                    let args = AttendArgs {
                        shape,
                        q: &q,
                        k_cache: &kc,
                        v_cache: &vc,
                        kv_head: head,
                        block_table: &table,
                        ctx_len: ctx,
                        scale: 0.2,
                    };
                    let mut out = vec![0f32; group * hd];
                    let mut scores = vec![0f32; group * ctx];
                    attend(isa, &args, &mut out, &mut scores);
                    if isa == Isa::Avx2 {
                        // The AVX2 path keeps the reference's order of operations: equal bits.
                        let mut reference = vec![0f32; group * hd];
                        attend_scalar(&args, &mut reference, &mut scores);
                        assert_eq!(out, reference, "avx2 group {group} head {head}");
                    }
                    for i in 0..group * hd {
                        assert!(
                            (out[i] - want[i]).abs() < 1e-5,
                            "{isa:?} group {group} head {head} i {i}: {} vs {}",
                            out[i],
                            want[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn paged_attention_f16() {
        check::<f16>("paged_attention_f16");
    }

    #[test]
    fn paged_attention_f32() {
        check::<f32>("paged_attention_f32");
    }
}
