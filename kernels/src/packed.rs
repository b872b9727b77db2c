//! Weight matrices in the compute layout.
//!
//! GGUF's layout is not the compute layout. At load time (`repack`) every
//! quantized matrix is repacked once into blocks of 32 unsigned codes u with a
//! per-block f32 scale d and, for the asymmetric types, an offset m:
//! value = d * (u - zero) + m. `zero` is the matrix's zero point:
//! - symmetric types (Q4_0, Q5_0, Q8_0, Q6_K) store w + 2^(bits-1) and no offsets;
//! - asymmetric ones (Q4_1, Q5_1, Q4_K, Q5_K) store u = q with zero 0 and their
//!   block minimum as m; in the 8-bit layout always zero 128 (u = q + 128), so its
//!   kernels may sum signed weights.
//!
//! The kernels sum `(u - zero) * q_x` exactly in integers; the offset becomes one
//! `m * s` term per block, where s = d_x * sum(q_x) comes with the activations.
//!
//! Byte layouts, per pair of neighbouring blocks (rows are padded to an even
//! number of blocks with zero weights):
//! - `Four`: 32 bytes; byte j holds element j of the even block in its low nibble
//!   and of the odd block in its high nibble, so a 256-bit load and two masks give
//!   64 activations' worth of weights.
//! - `Five`: those 32 nibble bytes, then a little-endian u64 of fifth bits: bit j
//!   for element j of the even block, bit 32 + j of the odd one (an AVX-512 byte
//!   mask as it stands). 40 bytes for 64 weights.
//! - `Eight`: 64 bytes, one per weight, the even block first.

use crate::quant::{GgmlType, QK};

/// Bits per stored weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bits {
    Four,
    Five,
    Eight,
}

impl Bits {
    pub fn width(self) -> u32 {
        match self {
            Bits::Four => 4,
            Bits::Five => 5,
            Bits::Eight => 8,
        }
    }

    /// Bytes per pair of 32-element blocks.
    pub fn pair_bytes(self) -> usize {
        match self {
            Bits::Four => QK,
            Bits::Five => QK + 8,
            Bits::Eight => 2 * QK,
        }
    }

    /// The stored code of element `j` of block `b` in a row laid out as `self`.
    pub fn code(self, row: &[u8], b: usize, j: usize) -> u8 {
        let pair = &row[(b / 2) * self.pair_bytes()..(b / 2 + 1) * self.pair_bytes()];
        let odd = b % 2;
        match self {
            Bits::Four | Bits::Five => {
                let nibble = (pair[j] >> (4 * odd)) & 0x0f;
                if self == Bits::Five {
                    let high = u64::from_le_bytes(pair[QK..QK + 8].try_into().unwrap());
                    nibble | (((high >> (32 * odd + j)) & 1) as u8) << 4
                } else {
                    nibble
                }
            }
            Bits::Eight => pair[odd * QK + j],
        }
    }
}

/// A quantized matrix of `rows` outputs by `cols` inputs in the compute layout.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: Bits,
    /// The code of a zero weight: value = d * (u - zero) + m.
    pub zero: u8,
    /// Blocks per row, rounded up to even.
    pub nbp: usize,
    /// Row-major; `row_bytes()` per row.
    pub qs: Vec<u8>,
    /// Per-block scale, `nbp` per row.
    pub d: Vec<f32>,
    /// Per-block offset, `nbp` per row; `None` for symmetric types.
    pub m: Option<Vec<f32>>,
    /// The type it came from (for reports).
    pub source: GgmlType,
}

impl PackedMatrix {
    pub fn row_bytes(&self) -> usize {
        self.nbp / 2 * self.bits.pair_bytes()
    }

    /// Element `(r, c)` as a float (slow; for tests and embedding lookups).
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let (b, j) = (c / QK, c % QK);
        let row = &self.qs[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        let w = self.bits.code(row, b, j) as i32 - self.zero as i32;
        let dw = self.d[r * self.nbp + b] * w as f32;
        match &self.m {
            Some(m) => dw + m[r * self.nbp + b],
            None => dw,
        }
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
            Weights::Packed(p) => p.qs.len() + 4 * (p.d.len() + p.m.as_ref().map_or(0, Vec::len)),
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
}
