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
//! - `packed`: weights repacked at load time into the compute layout.
//! - `matmul`: activation quantization and quantized matmul (scalar, AVX2, AVX-512 VNNI).
//! - `ops`: RMSNorm, RoPE, SwiGLU, residual adds.
//! - `attention`: paged KV writes and paged attention through block tables.

pub mod attention;
pub mod block;
pub mod cpu;
pub mod matmul;
pub mod ops;
pub mod packed;
pub mod pool;
pub mod quant;
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
