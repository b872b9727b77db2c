//! Test helpers: a small deterministic generator and random GGML tensors of
//! every supported type, with scales in the ranges real files use.

use half::f16;

use crate::kquant::QK_K;
use crate::quant::GgmlType;

pub(crate) struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// Uniform in -1..1.
    pub fn f(&mut self) -> f32 {
        self.next() as f32 / u32::MAX as f32 * 2.0 - 1.0
    }
}

fn put_f16(blk: &mut [u8], at: usize, v: f32) {
    blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// A random `rows` x `cols` tensor of type `t` as GGUF stores it. Q6_K's even
/// sub-blocks get equal scales for both halves (so both its exact and its
/// requantized repacking are exercised).
pub(crate) fn tensor(t: GgmlType, rows: usize, cols: usize, rng: &mut Lcg) -> Vec<u8> {
    let (be, bb) = t.block();
    let mut out = Vec::new();
    for _ in 0..rows * cols / be {
        let mut blk = vec![0u8; bb];
        for b in blk.iter_mut() {
            *b = rng.next() as u8;
        }
        let scale = 0.02 + rng.f().abs() * 0.05;
        let min = -0.1 * rng.f().abs();
        match t {
            GgmlType::F32 => blk.copy_from_slice(&rng.f().to_le_bytes()),
            GgmlType::F16 => put_f16(&mut blk, 0, rng.f()),
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => put_f16(&mut blk, 0, scale),
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                put_f16(&mut blk, 0, scale);
                put_f16(&mut blk, 2, min);
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                put_f16(&mut blk, 0, scale / 16.0);
                put_f16(&mut blk, 2, -min / 16.0);
            }
            GgmlType::Q6_K => {
                put_f16(&mut blk, 208, scale / 64.0);
                for s in (0..QK_K / 32).step_by(2) {
                    blk[192 + 2 * s + 1] = blk[192 + 2 * s];
                }
            }
        }
        out.extend_from_slice(&blk);
    }
    out
}
