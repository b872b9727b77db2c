//! Repacking GGML tensors into the compute layout (`PackedMatrix`), once at load.
//!
//! Every quantized type is first read block by block (32 elements) into one
//! integer form, value_j = d * code_j + m, then written in a layout (`Bits`):
//! the narrowest its codes fit, since batch-1 decode is bound by the bytes it
//! reads (Q4_*: 4-bit; Q5_*: 5-bit; Q8_0, Q6_K: 8-bit). The repacking is exact
//! (every value equals `quant::dequantize_row`'s, bit for bit) except for Q6_K,
//! whose 16-element scales have no place in 32-element blocks: a block whose two
//! scales are small multiples of a common step is exact, any other is
//! requantized to 8 bits (each value within half a step).

use crate::kquant::{self, QK_K};
use crate::packed::{Bits, PackedMatrix, Weights};
use crate::quant::{dequantize_row, f16_at, q5_codes, GgmlType, QK};

/// The layout a quantized type is repacked into; `None` for the dense types.
pub fn default_bits(t: GgmlType) -> Option<Bits> {
    match t {
        GgmlType::F32 | GgmlType::F16 => None,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => Some(Bits::Four),
        GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => Some(Bits::Five),
        GgmlType::Q8_0 | GgmlType::Q6_K => Some(Bits::Eight),
    }
}

/// Types whose values are d * (signed code), with no per-block offset.
fn is_symmetric(t: GgmlType) -> bool {
    matches!(t, GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q6_K)
}

/// Bits a type's codes need.
fn code_bits(t: GgmlType) -> u32 {
    match t {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => 4,
        GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => 5,
        _ => 8,
    }
}

/// One block of 32: value_j = d * codes_j + m. Codes are signed (centred on
/// zero, m = 0) for the symmetric types, unsigned otherwise.
struct IntBlock {
    codes: [i32; QK],
    d: f32,
    m: f32,
}

/// Block `b` of a row of type `t` (a quantized type).
fn int_block(t: GgmlType, row: &[u8], b: usize) -> IntBlock {
    let (_, bb) = t.block();
    let mut codes = [0i32; QK];
    if matches!(t, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K) {
        let blk = &row[(b * QK / QK_K) * bb..(b * QK / QK_K + 1) * bb];
        let s = b % (QK_K / QK);
        if t == GgmlType::Q6_K {
            return q6_k_block(blk, s);
        }
        let (u, d, m) = kquant::affine_sub_block(t, blk, s);
        for (c, u) in codes.iter_mut().zip(u) {
            *c = u as i32;
        }
        return IntBlock { codes, d, m };
    }
    let blk = &row[b * bb..(b + 1) * bb];
    let d = f16_at(blk, 0);
    let mut m = 0.0;
    match t {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let qs = if t == GgmlType::Q4_1 { &blk[4..20] } else { &blk[2..18] };
            let bias = if t == GgmlType::Q4_0 { 8 } else { 0 };
            for j in 0..16 {
                codes[j] = (qs[j] & 0x0f) as i32 - bias;
                codes[j + 16] = (qs[j] >> 4) as i32 - bias;
            }
        }
        GgmlType::Q5_0 => {
            for (c, u) in codes.iter_mut().zip(q5_codes(&blk[2..6], &blk[6..22])) {
                *c = u as i32 - 16;
            }
        }
        GgmlType::Q5_1 => {
            for (c, u) in codes.iter_mut().zip(q5_codes(&blk[4..8], &blk[8..24])) {
                *c = u as i32;
            }
        }
        GgmlType::Q8_0 => {
            for (c, &q) in codes.iter_mut().zip(&blk[2..34]) {
                *c = q as i8 as i32;
            }
        }
        _ => unreachable!("{t:?} is not a 32-element quantized type"),
    }
    if t == GgmlType::Q4_1 || t == GgmlType::Q5_1 {
        m = f16_at(blk, 2);
    }
    IntBlock { codes, d, m }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Sub-block `s` of a Q6_K super-block in 8-bit form. With g the greatest common
/// divisor of its two scales, q * sc / g are integers and d * g exact in f32; if
/// they fit in a signed byte (the scales differ by at most a factor of four over
/// g) the block is exact. Otherwise its values are requantized over their range.
fn q6_k_block(blk: &[u8], s: usize) -> IntBlock {
    let (q, sc, d) = kquant::q6_k_sub_block(blk, s);
    let mut codes = [0i32; QK];
    let g = gcd(sc[0].unsigned_abs() as u32, sc[1].unsigned_abs() as u32) as i32;
    if g == 0 {
        return IntBlock { codes, d: 0.0, m: 0.0 };
    }
    for (l, c) in codes.iter_mut().enumerate() {
        *c = q[l] as i32 * sc[l / 16] as i32 / g;
    }
    if codes.iter().all(|c| (-128..=127).contains(c)) {
        return IntBlock { codes, d: d * g as f32, m: 0.0 };
    }
    let values: Vec<f32> = (0..QK).map(|l| d * sc[l / 16] as f32 * q[l] as f32).collect();
    let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
    let step = amax / 127.0;
    for (c, v) in codes.iter_mut().zip(&values) {
        *c = ((v / step).round() as i32).clamp(-127, 127);
    }
    IntBlock { codes, d: step, m: 0.0 }
}

impl Weights {
    /// Repacks a GGML tensor of `rows` x `cols` (cols contiguous) into its default
    /// layout. `bytes` must hold exactly the tensor.
    pub fn from_ggml(t: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Result<Weights, String> {
        match default_bits(t) {
            Some(bits) => Self::from_ggml_as(t, bytes, rows, cols, bits),
            None => {
                check_size(t, bytes, rows, cols)?;
                let mut data = vec![0f32; rows * cols];
                let row_in = bytes.len() / rows.max(1);
                for r in 0..rows {
                    dequantize_row(t, &bytes[r * row_in..(r + 1) * row_in], &mut data[r * cols..(r + 1) * cols]);
                }
                Ok(Weights::Dense { rows, cols, data })
            }
        }
    }

    /// Repacks a quantized tensor into the layout `bits` (an error if its codes
    /// do not fit there); benchmarks compare layouts with it.
    pub fn from_ggml_as(t: GgmlType, bytes: &[u8], rows: usize, cols: usize, bits: Bits) -> Result<Weights, String> {
        if default_bits(t).is_none() || code_bits(t) > bits.width() {
            return Err(format!("{} does not fit the {}-bit layout", t.name(), bits.width()));
        }
        let row_in = check_size(t, bytes, rows, cols)?;
        let nb = cols / QK;
        let nbp = nb.div_ceil(2) * 2;
        let symmetric = is_symmetric(t);
        // Zero points as `packed` describes them; every stored code then lies in
        // 0..2^width (checked in debug builds).
        let zero = if symmetric || bits == Bits::Eight { 1u8 << (bits.width() - 1) } else { 0 };
        let mut p = PackedMatrix {
            rows,
            cols,
            bits,
            zero,
            nbp,
            qs: Vec::new(),
            d: vec![0f32; rows * nbp],
            m: (!symmetric).then(|| vec![0f32; rows * nbp]),
            source: t,
        };
        let row_out = p.row_bytes();
        let pair_bytes = bits.pair_bytes();
        // Padding blocks keep code 0 with d = m = 0: they contribute nothing.
        p.qs = vec![0; rows * row_out];
        for r in 0..rows {
            let src = &bytes[r * row_in..(r + 1) * row_in];
            let dst = &mut p.qs[r * row_out..(r + 1) * row_out];
            for b in 0..nb {
                let blk = int_block(t, src, b);
                p.d[r * nbp + b] = blk.d;
                if let Some(m) = &mut p.m {
                    m[r * nbp + b] = blk.m;
                }
                let pair = &mut dst[(b / 2) * pair_bytes..(b / 2 + 1) * pair_bytes];
                let odd = b % 2;
                let mut high = 0u64;
                for (j, &c) in blk.codes.iter().enumerate() {
                    let u = c + zero as i32;
                    debug_assert!(u >= 0 && u < 1 << bits.width(), "{t:?} code {c} in {bits:?}");
                    match bits {
                        Bits::Four | Bits::Five => {
                            pair[j] |= ((u & 0x0f) as u8) << (4 * odd);
                            high |= ((u >> 4) as u64 & 1) << (32 * odd + j);
                        }
                        Bits::Eight => pair[odd * QK + j] = u as u8,
                    }
                }
                if bits == Bits::Five {
                    let word = u64::from_le_bytes(pair[QK..QK + 8].try_into().unwrap()) | high;
                    pair[QK..QK + 8].copy_from_slice(&word.to_le_bytes());
                }
            }
        }
        Ok(Weights::Packed(p))
    }
}

/// Checks that `bytes` is exactly a `rows` x `cols` tensor of `t`; returns the bytes per row.
fn check_size(t: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Result<usize, String> {
    let (be, bb) = t.block();
    if !cols.is_multiple_of(be) {
        return Err(format!("{} rows of {cols} are not whole blocks of {be}", t.name()));
    }
    let row_in = cols / be * bb;
    if bytes.len() != rows * row_in {
        return Err(format!(
            "{} tensor of {rows}x{cols} should be {} bytes, got {}",
            t.name(),
            rows * row_in,
            bytes.len()
        ));
    }
    Ok(row_in)
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::quant::SUPPORTED;
    use crate::testutil::{tensor, Lcg};

    /// Column counts a type allows, including odd numbers of 32-element blocks.
    pub(crate) fn shapes(t: GgmlType) -> &'static [usize] {
        if t.block().0 == QK_K {
            &[256, 512, 768]
        } else {
            &[32, 64, 96, 160]
        }
    }

    fn reference_row(t: GgmlType, bytes: &[u8], rows: usize, r: usize, cols: usize) -> Vec<f32> {
        let row_in = bytes.len() / rows;
        let mut want = vec![0f32; cols];
        dequantize_row(t, &bytes[r * row_in..(r + 1) * row_in], &mut want);
        want
    }

    #[test]
    fn repacking_preserves_every_value_of_the_exact_types() {
        let mut rng = Lcg(3);
        for t in SUPPORTED.into_iter().filter(|&t| t != GgmlType::Q6_K) {
            for &cols in shapes(t) {
                let bytes = tensor(t, 3, cols, &mut rng);
                let w = Weights::from_ggml(t, &bytes, 3, cols).unwrap();
                assert_eq!(matches!(w, Weights::Packed(_)), default_bits(t).is_some());
                for r in 0..3 {
                    let mut got = vec![0f32; cols];
                    w.dequantize_row(r, &mut got);
                    assert_eq!(reference_row(t, &bytes, 3, r, cols), got, "{t:?} row {r} cols {cols}");
                }
            }
        }
    }

    #[test]
    fn types_repack_exactly_into_any_layout_wide_enough() {
        let mut rng = Lcg(4);
        let wider = [
            (GgmlType::Q4_0, Bits::Five),
            (GgmlType::Q4_1, Bits::Five),
            (GgmlType::Q4_K, Bits::Five),
            (GgmlType::Q4_0, Bits::Eight),
            (GgmlType::Q4_1, Bits::Eight),
            (GgmlType::Q4_K, Bits::Eight),
            (GgmlType::Q5_0, Bits::Eight),
            (GgmlType::Q5_1, Bits::Eight),
            (GgmlType::Q5_K, Bits::Eight),
        ];
        for (t, bits) in wider {
            let cols = shapes(t)[2];
            let bytes = tensor(t, 2, cols, &mut rng);
            let Weights::Packed(p) = Weights::from_ggml_as(t, &bytes, 2, cols, bits).unwrap() else { panic!() };
            assert_eq!(p.bits, bits);
            for r in 0..2 {
                let mut got = vec![0f32; cols];
                p.dequantize_row(r, &mut got);
                assert_eq!(reference_row(t, &bytes, 2, r, cols), got, "{t:?} into {bits:?}");
            }
        }
        for t in [GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q8_0] {
            let err = Weights::from_ggml_as(t, &tensor(t, 1, 256, &mut rng), 1, 256, Bits::Four).unwrap_err();
            assert_eq!(err, format!("{} does not fit the 4-bit layout", t.name()));
        }
        for t in [GgmlType::Q6_K, GgmlType::Q8_0] {
            let err = Weights::from_ggml_as(t, &tensor(t, 1, 256, &mut rng), 1, 256, Bits::Five).unwrap_err();
            assert_eq!(err, format!("{} does not fit the 5-bit layout", t.name()));
        }
    }

    /// Q6_K: blocks whose two halves share a scale (the generator makes every even
    /// sub-block so) are exact; every value of the others is within half a step.
    #[test]
    fn q6_k_is_exact_where_scales_allow_and_within_half_a_step_elsewhere() {
        let mut rng = Lcg(5);
        let (rows, cols) = (4, 768);
        let bytes = tensor(GgmlType::Q6_K, rows, cols, &mut rng);
        let Weights::Packed(p) = Weights::from_ggml(GgmlType::Q6_K, &bytes, rows, cols).unwrap() else { panic!() };
        assert_eq!((p.bits, p.m.is_none()), (Bits::Eight, true));
        let (mut exact, mut requantized) = (0, 0);
        for r in 0..rows {
            let want = reference_row(GgmlType::Q6_K, &bytes, rows, r, cols);
            for b in 0..cols / QK {
                let step = p.d[r * p.nbp + b];
                let same = (0..QK).all(|j| p.get(r, b * QK + j) == want[b * QK + j]);
                if b % 2 == 0 {
                    assert!(same, "row {r} block {b} has equal scales and must be exact");
                    exact += 1;
                } else if !same {
                    requantized += 1;
                    for j in 0..QK {
                        let (g, w) = (p.get(r, b * QK + j), want[b * QK + j]);
                        assert!((g - w).abs() <= 0.5 * step + 2e-6 * w.abs(), "row {r} block {b}: {g} vs {w}");
                    }
                }
            }
        }
        assert!(exact > 0 && requantized > 0, "{exact} exact, {requantized} requantized");
    }

    #[test]
    fn q6_k_scales_a_small_multiple_apart_stay_exact() {
        let mut blk = vec![0u8; kquant::Q6_K_BYTES];
        blk[208..210].copy_from_slice(&f16::from_f32(0.125).to_le_bytes());
        blk[192] = (-12i8) as u8; // halves scaled -12 and 48: g = 12, codes up to 4 * 32
        blk[193] = 48;
        blk[20] = 0x0f; // element 20 low bits 15 (second half)
        blk[128 + 20] = 0b11; // element 20 = 63: q - 32 = 31
        let Weights::Packed(p) = Weights::from_ggml(GgmlType::Q6_K, &blk, 1, 256).unwrap() else { panic!() };
        assert_eq!(p.d[0], 0.125 * 12.0);
        assert_eq!(p.get(0, 20), 0.125 * 48.0 * 31.0);
        assert_eq!(p.get(0, 0), 0.125 * -12.0 * -32.0);
        assert_eq!(p.get(0, 16), 0.125 * 48.0 * -32.0);
    }

    #[test]
    fn q8_0_and_q4_0_offsets() {
        let mut blk = vec![0u8; 34];
        blk[0..2].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        for j in 0..32 {
            blk[2 + j] = (j as i8 - 16) as u8;
        }
        let w = Weights::from_ggml(GgmlType::Q8_0, &blk, 1, 32).unwrap();
        let mut got = vec![0f32; 32];
        w.dequantize_row(0, &mut got);
        for (j, &v) in got.iter().enumerate() {
            assert_eq!(v, 0.25 * (j as f32 - 16.0));
        }
        let mut blk = vec![0u8; 18];
        blk[0..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        blk[2] = 0xf0;
        let w = Weights::from_ggml(GgmlType::Q4_0, &blk, 1, 32).unwrap();
        w.dequantize_row(0, &mut got);
        assert_eq!(got[0], -16.0);
        assert_eq!(got[16], 14.0);
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(Weights::from_ggml(GgmlType::Q4_1, &[0u8; 19], 1, 32).is_err());
        assert!(Weights::from_ggml(GgmlType::Q4_1, &[0u8; 20], 1, 31).is_err());
        assert_eq!(
            Weights::from_ggml(GgmlType::Q4_K, &[0u8; 72], 1, 128).unwrap_err(),
            "Q4_K rows of 128 are not whole blocks of 256"
        );
    }
}
