//! Weight matrices in the compute layout.
//!
//! GGUF's layout is not the compute layout. At load time (`repack`) every
//! quantized matrix is repacked once into blocks of 32 integers with a per-block
//! f32 scale d and offset m:
//! - 4-bit: value = d * u + m, u in 0..16 unsigned. Q4_1 and Q4_K: u = q, m = the
//!   block's minimum; Q4_0: u = q, m = -8 d.
//! - 8-bit: value = d * w + m, w in -128..128 signed, stored as w + 128. The
//!   symmetric types (Q8_0, Q6_K) keep no offsets (`m` is `None`); Q5_0 stores
//!   w = q - 16, Q5_1 and Q5_K w = q with their minimum as m.
//!
//! The kernels sum `u * q_x` (or `w * q_x`) in integers; the offset becomes one
//! `m * s` term per block, where s = d_x * sum(q_x) comes with the activations.
//! Two neighbouring 4-bit blocks share 32 bytes: byte j holds element j of the
//! even block in its low nibble and of the odd block in its high nibble, so a
//! 256-bit load and two masks give 64 activations' worth of weights. Rows are
//! padded to an even number of blocks with zero weights.

use crate::quant::{GgmlType, QK};

/// Bits per stored weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bits {
    Four,
    Eight,
}

impl Bits {
    pub fn width(self) -> u32 {
        match self {
            Bits::Four => 4,
            Bits::Eight => 8,
        }
    }
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
    /// Per-block offset, `nbp` per row; `None` when every block's is zero.
    pub m: Option<Vec<f32>>,
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
        let row = &self.qs[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        let code = match self.bits {
            Bits::Four => {
                let byte = row[(b / 2) * QK + j];
                (if b.is_multiple_of(2) { byte & 0x0f } else { byte >> 4 }) as i32
            }
            Bits::Eight => row[b * QK + j] as i32 - 128,
        };
        let dw = self.d[r * self.nbp + b] * code as f32;
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
