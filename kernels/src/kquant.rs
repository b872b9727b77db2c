//! GGML's "K-quant" super-blocks of 256 elements: Q4_K, Q5_K and Q6_K.
//!
//! A super-block holds eight 32-element sub-blocks, the unit of the compute
//! layout. Byte layouts (all little-endian, f16 scales):
//! - Q4_K (144 bytes): d, dmin, 12 bytes of packed 6-bit scales and mins, 128 bytes
//!   of nibbles. Sub-block s: value = d * sc_s * q - dmin * m_s, q in 0..16.
//! - Q5_K (176 bytes): as Q4_K, then 32 bytes of fifth bits before the nibbles;
//!   q in 0..32.
//! - Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of 2-bit high parts,
//!   16 signed 8-bit scales (one per 16 elements), then d. value = d * sc * (q - 32).
//!
//! In Q4_K and Q5_K, sub-blocks 2c and 2c + 1 share the 32 nibble bytes
//! `32c..32c + 32`: element l of the even one is byte l's low nibble, of the odd
//! one its high nibble (the compute layout's 4-bit pairing, by design).

use crate::quant::{f16_at, GgmlType, QK};

/// Elements per super-block.
pub const QK_K: usize = 256;
pub const Q4_K_BYTES: usize = 144;
pub const Q5_K_BYTES: usize = 176;
pub const Q6_K_BYTES: usize = 210;

/// The 6-bit scale and min of sub-block `s` (0..8) from the 12 packed bytes:
/// sub-blocks 0..4 keep theirs in the low 6 bits of bytes s and s + 4; sub-blocks
/// 4..8 in byte s + 4's two nibbles, with the top two bits in the spare high
/// bits of bytes s - 4 (scale) and s (min).
pub(crate) fn scale_min(s: usize, packed: &[u8]) -> (u8, u8) {
    if s < 4 {
        (packed[s] & 63, packed[s + 4] & 63)
    } else {
        let sc = (packed[s + 4] & 0x0f) | (packed[s - 4] >> 6) << 4;
        let m = (packed[s + 4] >> 4) | (packed[s] >> 6) << 4;
        (sc, m)
    }
}

/// Sub-block `s` of a Q4_K or Q5_K super-block as unsigned codes `u` with
/// value = d * u + m exactly (d = d_super * sc, m = -(dmin * min): both are
/// products of an f16 and a 6-bit integer, exact in f32).
pub(crate) fn affine_sub_block(t: GgmlType, blk: &[u8], s: usize) -> ([u8; QK], f32, f32) {
    let (sc, mn) = scale_min(s, &blk[4..16]);
    let d = f16_at(blk, 0) * sc as f32;
    let m = -(f16_at(blk, 2) * mn as f32);
    let (qh, qs) = match t {
        GgmlType::Q4_K => (None, &blk[16..16 + 128]),
        GgmlType::Q5_K => (Some(&blk[16..48]), &blk[48..48 + 128]),
        _ => unreachable!("{t:?} is not an affine K-quant"),
    };
    let nibbles = &qs[(s / 2) * QK..(s / 2 + 1) * QK];
    let mut u = [0u8; QK];
    for l in 0..QK {
        u[l] = if s.is_multiple_of(2) { nibbles[l] & 0x0f } else { nibbles[l] >> 4 };
        if let Some(qh) = qh {
            u[l] |= ((qh[l] >> s) & 1) << 4;
        }
    }
    (u, d, m)
}

/// Sub-block `s` of a Q6_K super-block: the signed codes q - 32 (in -32..32), the
/// two 16-element scales (elements 0..16, then 16..32) and the super-block's d.
pub(crate) fn q6_k_sub_block(blk: &[u8], s: usize) -> ([i8; QK], [i8; 2], f32) {
    let (half, quarter) = (s / 4, s % 4);
    let ql = &blk[64 * half..64 * half + 64];
    let qh = &blk[128 + 32 * half..128 + 32 * half + 32];
    let mut q = [0i8; QK];
    for l in 0..QK {
        let low = if quarter < 2 { ql[32 * quarter + l] & 0x0f } else { ql[32 * (quarter - 2) + l] >> 4 };
        let high = (qh[l] >> (2 * quarter)) & 3;
        q[l] = (low | high << 4) as i8 - 32;
    }
    let scales = [blk[192 + 2 * s] as i8, blk[192 + 2 * s + 1] as i8];
    (q, scales, f16_at(blk, 208))
}

/// Dequantizes one super-block of `t` into `out[..256]` (the reference).
pub(crate) fn dequantize_super_block(t: GgmlType, blk: &[u8], out: &mut [f32]) {
    for (s, o) in out[..QK_K].chunks_exact_mut(QK).enumerate() {
        match t {
            GgmlType::Q6_K => {
                let (q, scales, d) = q6_k_sub_block(blk, s);
                for (l, o) in o.iter_mut().enumerate() {
                    *o = d * scales[l / 16] as f32 * q[l] as f32;
                }
            }
            _ => {
                let (u, d, m) = affine_sub_block(t, blk, s);
                for (o, u) in o.iter_mut().zip(u) {
                    *o = d * u as f32 + m;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::quant::dequantize_row;

    fn put_f16(blk: &mut [u8], at: usize, v: f32) {
        blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
    }

    /// Packs eight (scale, min) pairs the way GGML does, independently of `scale_min`.
    fn pack_scales(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
        let mut p = [0u8; 12];
        for j in 0..4 {
            p[j] = sc[j] | (sc[j + 4] >> 4) << 6;
            p[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6;
            p[j + 8] = (sc[j + 4] & 0x0f) | (mn[j + 4] & 0x0f) << 4;
        }
        p
    }

    #[test]
    fn scale_and_min_unpack_for_every_sub_block() {
        let sc = [1, 63, 17, 32, 5, 48, 63, 33];
        let mn = [62, 0, 31, 9, 60, 16, 1, 47];
        let packed = pack_scales(sc, mn);
        for s in 0..8 {
            assert_eq!(scale_min(s, &packed), (sc[s], mn[s]), "sub-block {s}");
        }
    }

    #[test]
    fn q4_k_hand_built_super_block() {
        let mut blk = vec![0u8; Q4_K_BYTES];
        put_f16(&mut blk, 0, 0.5);
        put_f16(&mut blk, 2, 0.25);
        blk[4..16].copy_from_slice(&pack_scales([2, 3, 4, 5, 6, 7, 40, 41], [1, 2, 3, 4, 5, 6, 50, 51]));
        blk[16] = 0x9c; // sub-block 0 element 0 = 12, sub-block 1 element 0 = 9
        blk[16 + 3 * 32 + 31] = 0x7f; // sub-block 6 element 31 = 15, sub-block 7 element 31 = 7
        let mut out = vec![0f32; QK_K];
        dequantize_row(GgmlType::Q4_K, &blk, &mut out);
        assert_eq!(out[0], 0.5 * 2.0 * 12.0 - 0.25 * 1.0);
        assert_eq!(out[32], 0.5 * 3.0 * 9.0 - 0.25 * 2.0);
        assert_eq!(out[1], -0.25);
        assert_eq!(out[6 * 32 + 31], 0.5 * 40.0 * 15.0 - 0.25 * 50.0);
        assert_eq!(out[7 * 32 + 31], 0.5 * 41.0 * 7.0 - 0.25 * 51.0);
        assert_eq!(out[7 * 32], -0.25 * 51.0);
    }

    #[test]
    fn q5_k_takes_sub_block_s_fifth_bit_from_bit_s_of_qh() {
        let mut blk = vec![0u8; Q5_K_BYTES];
        put_f16(&mut blk, 0, 1.0);
        put_f16(&mut blk, 2, 0.5);
        blk[4..16].copy_from_slice(&pack_scales([1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 0, 1, 0, 1, 0, 2]));
        blk[16 + 5] = 0b1000_0001; // element 5 of sub-blocks 0 and 7 gain 16
        blk[16 + 6] = 0b0000_0010; // element 6 of sub-block 1
        blk[48 + 5] = 0x3a; // sub-block 0 element 5 = 10, sub-block 1 element 5 = 3
        blk[48 + 6] = 0x4b; // sub-block 0 element 6 = 11, sub-block 1 element 6 = 4
        blk[48 + 3 * 32 + 5] = 0xe0; // sub-block 6 element 5 = 0, sub-block 7 element 5 = 14
        let mut out = vec![0f32; QK_K];
        dequantize_row(GgmlType::Q5_K, &blk, &mut out);
        assert_eq!(out[5], 1.0 * (10.0 + 16.0));
        assert_eq!(out[32 + 5], 2.0 * 3.0 - 0.5);
        assert_eq!(out[6], 11.0);
        assert_eq!(out[32 + 6], 2.0 * (4.0 + 16.0) - 0.5);
        assert_eq!(out[6 * 32 + 5], 0.0);
        assert_eq!(out[7 * 32 + 5], 8.0 * (14.0 + 16.0) - 0.5 * 2.0);
    }

    #[test]
    fn q6_k_hand_built_super_block() {
        let mut blk = vec![0u8; Q6_K_BYTES];
        put_f16(&mut blk, 208, 0.5);
        for (i, s) in blk[192..208].iter_mut().enumerate() {
            *s = (i as i8 - 8) as u8; // scales -8..8
        }
        // Element 0 (sub-block 0, scale -8): low 5 from ql[0] low, high 2 from qh[0] bits 0..2.
        blk[0] = 0x05;
        blk[128] = 0b10_01_11_01; // e0 high 1, e32 high 3, e64 high 1, e96 high 2
        blk[32] = 0x90; // e32 low 0, e96 low 9
        blk[0] |= 0x70; // e64 low 7
                        // Element 128 + 16 + 3 (sub-block 4, its second half: scale index 9 = 1).
        blk[64 + 19] = 0x0c;
        blk[128 + 32 + 19] = 0b11;
        let mut out = vec![0f32; QK_K];
        dequantize_row(GgmlType::Q6_K, &blk, &mut out);
        assert_eq!(out[0], 0.5 * -8.0 * ((5 + 16) as f32 - 32.0));
        assert_eq!(out[32], 0.5 * -6.0 * (48.0 - 32.0));
        assert_eq!(out[64], 0.5 * -4.0 * ((7 + 16) as f32 - 32.0));
        assert_eq!(out[96], 0.5 * -2.0 * ((9 + 32) as f32 - 32.0));
        assert_eq!(out[128 + 19], 0.5 * 1.0 * ((12 + 48) as f32 - 32.0));
        assert_eq!(out[1], 0.5 * -8.0 * -32.0);
        assert_eq!(out[17], 0.5 * -7.0 * -32.0);
    }

    #[test]
    fn rows_of_k_quants_dequantize_super_block_by_super_block() {
        let mut row = vec![0u8; 2 * Q6_K_BYTES];
        put_f16(&mut row, Q6_K_BYTES + 208, 1.0);
        row[Q6_K_BYTES + 192] = 3;
        let mut out = vec![0f32; 2 * QK_K];
        dequantize_row(GgmlType::Q6_K, &row, &mut out);
        assert!(out[..QK_K].iter().all(|&v| v == 0.0));
        assert_eq!(out[QK_K], 3.0 * -32.0);
        assert_eq!(out[QK_K + 16], 0.0);
    }
}
