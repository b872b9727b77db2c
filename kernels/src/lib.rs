//! # tandem-kernels
//!
//! CPU compute kernels for Tandem's forward pass. Pure functions over slices:
//! no model knowledge, no allocation in the hot paths, no I/O.
//!
//! ## Layout
//! - `block`: `BlockId`, a block's index in the paged KV pool (shared with the engine and kvtransfer).
//! - `cpu`: which SIMD family runs (`Isa`), detected at run time; never `target-cpu=native`.
//! - `pool`: a persistent spinning thread pool; one data-parallel job at a time.
//! - `quant`: GGML tensor types and scalar dequantization (the reference).
//! - `kquant`: the 256-element K-quant super-blocks (Q4_K, Q5_K, Q6_K).
//! - `packed`: weights in the compute layout.
//! - `repack`: GGML tensors into the compute layout, once at load time.
//! - `matmul`: activation quantization and quantized matmul (scalar, AVX2, AVX-512 VNNI).
//! - `ops`: RMSNorm, RoPE, SwiGLU, residual adds.
//! - `attention`: paged KV writes and paged attention through block tables.

pub mod attention;
pub mod block;
pub mod cpu;
mod kquant;
pub mod matmul;
pub mod ops;
pub mod packed;
pub mod pool;
pub mod quant;
pub mod repack;
#[cfg(test)]
mod testutil;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_attn;

pub use attention::{KvElem, KvShape};
pub use block::BlockId;
pub use cpu::Isa;
pub use matmul::{matmul, QuantizedActs};
pub use packed::{PackedMatrix, Weights};
pub use pool::ThreadPool;
pub use quant::GgmlType;
