//! GGML tensor types as stored in GGUF files, their sizes, and scalar
//! dequantization (the reference every SIMD path is tested against).

use half::f16;

/// Tensor element types this crate can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

/// Elements per quantization block for the 32-element formats.
pub const QK: usize = 32;

impl GgmlType {
    /// Maps a GGML type id to a supported type; `None` for types not implemented here.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            _ => return None,
        })
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

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
        }
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 => (1, 2),
            GgmlType::Q4_0 => (QK, 18),
            GgmlType::Q4_1 => (QK, 20),
            GgmlType::Q8_0 => (QK, 34),
        }
    }

    /// Bytes taken by `n_elements` with rows of `row_len`; an error if rows are not whole blocks.
    pub fn byte_size(self, n_elements: u64, row_len: u64) -> Result<u64, String> {
        let (be, bb) = self.block();
        if row_len % be as u64 != 0 {
            return Err(format!("row length {row_len} is not a multiple of the {} block size {be}", self.name()));
        }
        Ok(n_elements / be as u64 * bb as u64)
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes a row of `out.len()` elements stored as `t` in `bytes`.
/// Panics only if `bytes` is shorter than the row (callers size it with `byte_size`).
pub fn dequantize_row(t: GgmlType, bytes: &[u8], out: &mut [f32]) {
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
            for (blk, o) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    o[j] = d * ((blk[2 + j] & 0x0f) as f32 - 8.0);
                    o[j + 16] = d * ((blk[2 + j] >> 4) as f32 - 8.0);
                }
            }
        }
        GgmlType::Q4_1 => {
            for (blk, o) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                for j in 0..16 {
                    o[j] = d * (blk[4 + j] & 0x0f) as f32 + m;
                    o[j + 16] = d * (blk[4 + j] >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (blk, o) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(blk, 0);
                for j in 0..QK {
                    o[j] = d * (blk[2 + j] as i8) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_dequantizes_low_then_high_nibbles() {
        let mut blk = vec![0u8; 20];
        blk[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        blk[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        blk[4] = 0x3a; // element 0 = 10, element 16 = 3
        let mut out = [0f32; 32];
        dequantize_row(GgmlType::Q4_1, &blk, &mut out);
        assert_eq!(out[0], 0.5 * 10.0 - 1.0);
        assert_eq!(out[16], 0.5 * 3.0 - 1.0);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn sizes_require_whole_blocks() {
        assert_eq!(GgmlType::Q4_1.byte_size(64, 64), Ok(40));
        assert!(GgmlType::Q8_0.byte_size(48, 48).is_err());
        assert_eq!(GgmlType::F16.byte_size(3, 3), Ok(6));
        assert_eq!(GgmlType::name_of_id(14), "Q6_K");
    }
}
