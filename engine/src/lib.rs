//! # tandem-engine
//!
//! The model runtime both worker kinds run: weights, the forward pass, the KV cache, the
//! scheduler and the engine loop. The text side it works with (GGUF reading, `ModelConfig`,
//! tokenizer, chat template, prompt ids, and `ModelText`, the loader) is `tandem-text`,
//! which the router uses without linking the kernels.
//!
//! ## Layout
//! - `error`: `EngineError`, with a `kind()` label (the text side's errors convert into it).
//! - `finish`: `FinishReason`, why a sequence ended (scheduler, loop and `generate` alike).
//! - `model`: weights in the compute layout (GGML types mapped to the kernels') and the
//!   batched forward pass over the paged cache.
//! - `kv_cache`: paged K/V storage (`KvCache`) and its byte views for shipping (`LayerKvBytes`); block
//!   ownership lives in `block_manager`.
//! - `block_manager`: block ownership, the prefix cache (chained hashes), eviction order, KV events.
//! - `scheduler`: continuous batching with chunked prefill and preemption; `schedule()` then `update()`.
//! - `llm_engine`: the engine loop: schedule, forward, sample, detokenize; many requests at once.
//! - `generate`: `Engine` (model + tokenizer + chat template) and the single-request loop.
//! - `sampling`: `SamplingParams` (validated) and the seeded `Sampler`.
//! - `stop`: `StopMatcher`, stop strings over streamed text.

pub mod block_manager;
pub mod error;
pub mod finish;
pub mod generate;
pub mod kv_cache;
pub mod llm_engine;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod share;
pub mod stop;

pub use error::EngineError;
pub use finish::FinishReason;
pub use generate::{Choice, Engine, EngineConfig, Generation};
