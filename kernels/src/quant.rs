//! GGML tensor types as stored in GGUF files, their sizes, and scalar
//! dequantization (the reference every repacked layout and SIMD path is tested
//! against). The 256-element "K-quant" super-blocks are decoded in `kquant`.

use half::f16;

use crate::kquant;

/// Tensor element types this crate can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// Elements per quantization block for the 32-element formats (and per
/// sub-block of the K-quants): the block size of the compute layout.
pub const QK: usize = 32;

/// Every type `from_id` accepts, in GGML id order.
pub const SUPPORTED: [GgmlType; 10] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

impl GgmlType {
    /// The GGML type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
        }
    }

    /// Maps a GGML type id to a supported type; `None` for types not implemented here.
    pub fn from_id(id: u32) -> Option<Self> {
        SUPPORTED.into_iter().find(|t| t.id() == id)
    }

    /// The GGML name of a type id, for error messages (also for unsupported ids).
    pub fn name_of_id(id: u32) -> String {
        let known = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
            "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
            "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
        ];
        known.get(id as usize).map(|s| s.to_string()).unwrap_or_else(|| format!("type id {id}"))
    }

    /// The supported types' names, comma-separated (for "not supported" errors).
    pub fn supported_names() -> String {
        SUPPORTED.map(GgmlType::name).join(", ")
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 => (1, 2),
            GgmlType::Q4_0 => (QK, 18),
            GgmlType::Q4_1 => (QK, 20),
            GgmlType::Q5_0 => (QK, 22),
            GgmlType::Q5_1 => (QK, 24),
            GgmlType::Q8_0 => (QK, 34),
            GgmlType::Q4_K => (kquant::QK_K, kquant::Q4_K_BYTES),
            GgmlType::Q5_K => (kquant::QK_K, kquant::Q5_K_BYTES),
            GgmlType::Q6_K => (kquant::QK_K, kquant::Q6_K_BYTES),
        }
    }

    /// Bytes taken by `n_elements` with rows of `row_len`; an error if rows are not whole blocks.
    pub fn byte_size(self, n_elements: u64, row_len: u64) -> Result<u64, String> {
        let (be, bb) = self.block();
        if !row_len.is_multiple_of(be as u64) {
            return Err(format!("row length {row_len} is not a multiple of the {} block size {be}", self.name()));
        }
        Ok(n_elements / be as u64 * bb as u64)
    }
}

pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 5-bit codes of a Q5_0/Q5_1 block: element j < 16 is the low nibble of
/// `qs[j]`, element j + 16 its high nibble; bit j of the little-endian `qh`
/// word is element j's fifth bit.
pub(crate) fn q5_codes(qh: &[u8], qs: &[u8]) -> [u8; QK] {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut u = [0u8; QK];
    for j in 0..16 {
        u[j] = (qs[j] & 0x0f) | (((high >> j) & 1) as u8) << 4;
        u[j + 16] = (qs[j] >> 4) | (((high >> (j + 16)) & 1) as u8) << 4;
    }
    u
}

/// Dequantizes a row of `out.len()` elements stored as `t` in `bytes`.
/// Panics only if `bytes` is shorter than the row (callers size it with `byte_size`).
pub fn dequantize_row(t: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (_, bb) = t.block();
    match t {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().unwrap());
            }
        }
        GgmlType::F16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f16_at(bytes, 2 * i);
            }
        }
        GgmlType::Q4_0 => {
            for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    o[j] = d * ((blk[2 + j] & 0x0f) as f32 - 8.0);
                    o[j + 16] = d * ((blk[2 + j] >> 4) as f32 - 8.0);
                }
            }
        }
        GgmlType::Q4_1 => {
            for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                for j in 0..16 {
                    o[j] = d * (blk[4 + j] & 0x0f) as f32 + m;
                    o[j + 16] = d * (blk[4 + j] >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Q5_0 => {
            for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(blk, 0);
                for (o, u) in o.iter_mut().zip(q5_codes(&blk[2..6], &blk[6..22])) {
                    *o = d * (u as f32 - 16.0);
                }
            }
        }
        GgmlType::Q5_1 => {
            for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                for (o, u) in o.iter_mut().zip(q5_codes(&blk[4..8], &blk[8..24])) {
                    *o = d * u as f32 + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(blk, 0);
                for j in 0..QK {
                    o[j] = d * (blk[2 + j] as i8) as f32;
                }
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(kquant::QK_K)) {
                kquant::dequantize_super_block(t, blk, o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_f16(blk: &mut [u8], at: usize, v: f32) {
        blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
    }

    #[test]
    fn q4_1_dequantizes_low_then_high_nibbles() {
        let mut blk = vec![0u8; 20];
        put_f16(&mut blk, 0, 0.5);
        put_f16(&mut blk, 2, -1.0);
        blk[4] = 0x3a; // element 0 = 10, element 16 = 3
        let mut out = [0f32; 32];
        dequantize_row(GgmlType::Q4_1, &blk, &mut out);
        assert_eq!(out[0], 0.5 * 10.0 - 1.0);
        assert_eq!(out[16], 0.5 * 3.0 - 1.0);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn q5_0_takes_the_fifth_bit_of_element_j_from_bit_j_of_qh() {
        let mut blk = vec![0u8; 22];
        put_f16(&mut blk, 0, 0.25);
        // qh bits 0, 17 and 31 set: elements 0, 17 and 31 gain 16.
        blk[2..6].copy_from_slice(&(1u32 | 1 << 17 | 1 << 31).to_le_bytes());
        blk[6] = 0x2f; // element 0: 15 | 16 = 31; element 16: 2
        blk[7] = 0x50; // element 1: 0; element 17: 5 | 16 = 21
        blk[21] = 0xf1; // element 15: 1; element 31: 15 | 16 = 31
        let mut out = [0f32; 32];
        dequantize_row(GgmlType::Q5_0, &blk, &mut out);
        assert_eq!(out[0], 0.25 * (31.0 - 16.0));
        assert_eq!(out[16], 0.25 * (2.0 - 16.0));
        assert_eq!(out[1], 0.25 * -16.0);
        assert_eq!(out[17], 0.25 * (21.0 - 16.0));
        assert_eq!(out[15], 0.25 * (1.0 - 16.0));
        assert_eq!(out[31], 0.25 * 15.0);
        assert_eq!(out[2], -4.0);
    }

    #[test]
    fn q5_1_adds_its_minimum_to_unsigned_codes() {
        let mut blk = vec![0u8; 24];
        put_f16(&mut blk, 0, 0.5);
        put_f16(&mut blk, 2, -3.0);
        blk[4..8].copy_from_slice(&(1u32 << 4 | 1 << 20).to_le_bytes());
        blk[8 + 4] = 0x97; // element 4: 7 | 16 = 23; element 20: 9 | 16 = 25
        blk[8 + 5] = 0x08; // element 5: 8; element 21: 0
        let mut out = [0f32; 32];
        dequantize_row(GgmlType::Q5_1, &blk, &mut out);
        assert_eq!(out[4], 0.5 * 23.0 - 3.0);
        assert_eq!(out[20], 0.5 * 25.0 - 3.0);
        assert_eq!(out[5], 0.5 * 8.0 - 3.0);
        assert_eq!(out[21], -3.0);
    }

    #[test]
    fn sizes_require_whole_blocks() {
        assert_eq!(GgmlType::Q4_1.byte_size(64, 64), Ok(40));
        assert!(GgmlType::Q8_0.byte_size(48, 48).is_err());
        assert_eq!(GgmlType::F16.byte_size(3, 3), Ok(6));
        assert_eq!(GgmlType::name_of_id(14), "Q6_K");
        assert_eq!(GgmlType::Q5_0.byte_size(64, 32), Ok(44));
        assert_eq!(GgmlType::Q5_1.byte_size(64, 32), Ok(48));
        assert_eq!(GgmlType::Q4_K.byte_size(512, 256), Ok(288));
        assert_eq!(GgmlType::Q5_K.byte_size(512, 512), Ok(352));
        assert_eq!(GgmlType::Q6_K.byte_size(256, 256), Ok(210));
        assert_eq!(
            GgmlType::Q6_K.byte_size(896, 896),
            Err("row length 896 is not a multiple of the Q6_K block size 256".to_string())
        );
    }

    #[test]
    fn ids_round_trip_and_unsupported_types_are_refused_by_name() {
        for t in SUPPORTED {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::name_of_id(t.id()), t.name());
        }
        for unsupported in ["Q2_K", "Q3_K", "IQ4_XS", "Q8_1", "BF16"] {
            let id = (0..64).find(|&id| GgmlType::name_of_id(id) == unsupported).unwrap();
            assert_eq!(GgmlType::from_id(id), None, "{unsupported}");
        }
        assert_eq!(GgmlType::supported_names(), "F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K");
    }
}
