//! Weight matrices in the compute layout.
//!
//! GGUF's layout is not the compute layout. At load time every quantized
//! matrix is repacked once into one form, "unsigned integers with a per-block
//! scale and offset": value = d * u + m, u in 0..16 (4-bit) or 0..256 (8-bit).
//! - Q4_1: u = q, m = min.  Q4_0: u = q, m = -8 d.  Q8_0: u = q + 128, m = -128 d.
//!
//! Unsigned weights feed `vpdpbusd` (u8 x i8) directly; the offset becomes one
//! `m * s` term per block, where s = d_x * sum(q_x) comes with the activations.
//! Two neighbouring 4-bit blocks share 32 bytes: byte j holds element j of the
//! even block in its low nibble and of the odd block in its high nibble, so a
//! 256-bit load and two masks give 64 activations' worth of weights. Rows are
//! padded to an even number of blocks with zero weights.

use half::f16;

use crate::quant::{dequantize_row, GgmlType, QK};

/// Bits per stored weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bits {
    Four,
    Eight,
}

/// A quantized matrix of `rows` outputs by `cols` inputs in the compute layout.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: Bits,
    /// Blocks per row, rounded up to even.
    pub nbp: usize,
    /// Row-major; `row_bytes()` per row.
    pub qs: Vec<u8>,
    /// Per-block scale, `nbp` per row.
    pub d: Vec<f32>,
    /// Per-block offset, `nbp` per row.
    pub m: Vec<f32>,
    /// The type it came from (for reports).
    pub source: GgmlType,
}

impl PackedMatrix {
    pub fn row_bytes(&self) -> usize {
        match self.bits {
            Bits::Four => self.nbp * QK / 2,
            Bits::Eight => self.nbp * QK,
        }
    }

    /// Element `(r, c)` as a float (slow; for tests and embedding lookups).
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let b = c / QK;
        let j = c % QK;
        let u = match self.bits {
            Bits::Four => {
                let byte = self.qs[r * self.row_bytes() + (b / 2) * QK + j];
                if b % 2 == 0 {
                    byte & 0x0f
                } else {
                    byte >> 4
                }
            }
            Bits::Eight => self.qs[r * self.row_bytes() + b * QK + j],
        };
        self.d[r * self.nbp + b] * u as f32 + self.m[r * self.nbp + b]
    }

    /// Row `r` as floats.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (c, o) in out.iter_mut().enumerate().take(self.cols) {
            *o = self.get(r, c);
        }
    }
}

/// A weight matrix as the matmul kernels consume it.
#[derive(Debug, Clone)]
pub enum Weights {
    Packed(PackedMatrix),
    /// F32 and F16 tensors, kept as f32 rows.
    Dense {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    },
}

impl Weights {
    pub fn rows(&self) -> usize {
        match self {
            Weights::Packed(p) => p.rows,
            Weights::Dense { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Weights::Packed(p) => p.cols,
            Weights::Dense { cols, .. } => *cols,
        }
    }

    /// Bytes the matrix occupies in memory.
    pub fn nbytes(&self) -> usize {
        match self {
            Weights::Packed(p) => p.qs.len() + 4 * (p.d.len() + p.m.len()),
            Weights::Dense { data, .. } => 4 * data.len(),
        }
    }

    /// Row `r` as floats.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match self {
            Weights::Packed(p) => p.dequantize_row(r, out),
            Weights::Dense { cols, data, .. } => out[..*cols].copy_from_slice(&data[r * cols..(r + 1) * cols]),
        }
    }

    /// Repacks a GGML tensor of `rows` x `cols` (cols contiguous). `bytes` must hold exactly
    /// the tensor; the caller has checked sizes.
    pub fn from_ggml(t: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Result<Weights, String> {
        let (be, bb) = t.block();
        if cols % be != 0 {
            return Err(format!("{} rows of {cols} are not whole blocks", t.name()));
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
        let nb = cols / QK;
        let nbp = nb.div_ceil(2) * 2;
        match t {
            GgmlType::F32 | GgmlType::F16 => {
                let mut data = vec![0f32; rows * cols];
                for r in 0..rows {
                    dequantize_row(t, &bytes[r * row_in..(r + 1) * row_in], &mut data[r * cols..(r + 1) * cols]);
                }
                Ok(Weights::Dense { rows, cols, data })
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let row_out = nbp * QK / 2;
                let mut qs = vec![0u8; rows * row_out];
                let mut d = vec![0f32; rows * nbp];
                let mut m = vec![0f32; rows * nbp];
                let off = if t == GgmlType::Q4_1 { 4 } else { 2 };
                for r in 0..rows {
                    for b in 0..nb {
                        let blk = &bytes[r * row_in + b * bb..r * row_in + (b + 1) * bb];
                        let scale = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                        d[r * nbp + b] = scale;
                        m[r * nbp + b] = if t == GgmlType::Q4_1 {
                            f16::from_le_bytes([blk[2], blk[3]]).to_f32()
                        } else {
                            -8.0 * scale
                        };
                        let dst = &mut qs[r * row_out + (b / 2) * QK..r * row_out + (b / 2 + 1) * QK];
                        let shift = if b % 2 == 0 { 0 } else { 4 };
                        for j in 0..16 {
                            dst[j] |= (blk[off + j] & 0x0f) << shift;
                            dst[j + 16] |= (blk[off + j] >> 4) << shift;
                        }
                    }
                }
                Ok(Weights::Packed(PackedMatrix { rows, cols, bits: Bits::Four, nbp, qs, d, m, source: t }))
            }
            GgmlType::Q8_0 => {
                let row_out = nbp * QK;
                let mut qs = vec![0u8; rows * row_out];
                let mut d = vec![0f32; rows * nbp];
                let mut m = vec![0f32; rows * nbp];
                for r in 0..rows {
                    for b in 0..nb {
                        let blk = &bytes[r * row_in + b * bb..r * row_in + (b + 1) * bb];
                        let scale = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                        d[r * nbp + b] = scale;
                        m[r * nbp + b] = -128.0 * scale;
                        for j in 0..QK {
                            qs[r * row_out + b * QK + j] = blk[2 + j] ^ 0x80;
                        }
                    }
                    // Padding blocks: u = 128 with d = m = 0 contributes nothing.
                }
                Ok(Weights::Packed(PackedMatrix { rows, cols, bits: Bits::Eight, nbp, qs, d, m, source: t }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q4_1_tensor(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as u8
        };
        let mut out = Vec::new();
        for _ in 0..rows * cols / QK {
            out.extend_from_slice(&f16::from_f32(0.01 + (next() as f32) / 5000.0).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(-0.05).to_le_bytes());
            for _ in 0..16 {
                out.push(next());
            }
        }
        out
    }

    #[test]
    fn repacking_preserves_every_value() {
        for cols in [32, 64, 96] {
            let bytes = q4_1_tensor(3, cols, 7);
            let w = Weights::from_ggml(GgmlType::Q4_1, &bytes, 3, cols).unwrap();
            let row_in = cols / QK * 20;
            for r in 0..3 {
                let mut want = vec![0f32; cols];
                dequantize_row(GgmlType::Q4_1, &bytes[r * row_in..(r + 1) * row_in], &mut want);
                let mut got = vec![0f32; cols];
                w.dequantize_row(r, &mut got);
                assert_eq!(want, got, "row {r} cols {cols}");
            }
        }
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
        for j in 0..32 {
            assert_eq!(got[j], 0.25 * (j as f32 - 16.0));
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
    }
}
