//! # tandem-engine
//!
//! The model runtime both worker kinds run.
//!
//! ## Layout
//! - `gguf`: reads GGUF files (bounds-checked; corrupt files are errors).
//! - `error`: `EngineError`, with a `kind()` label.
//! - `config`: `ModelConfig`, the hyperparameters read from GGUF metadata.
//! - `finish`: `FinishReason`, why a sequence ended (scheduler, loop and `generate` alike).
//! - `model`: weights in the compute layout and the batched forward pass over the paged cache.
//! - `kv_cache`: paged K/V storage (`KvCache`) and its byte views for shipping (`LayerKvBytes`); block
//!   ownership lives in `block_manager`.
//! - `block_manager`: block ownership, the prefix cache (chained hashes), eviction order, KV events.
//! - `scheduler`: continuous batching with chunked prefill and preemption; `schedule()` then `update()`.
//! - `llm_engine`: the engine loop: schedule, forward, sample, detokenize; many requests at once.
//! - `generate`: `Engine` (model + tokenizer + chat template) and the single-request loop.
//! - `tokenizer`: GGUF byte-level BPE tokenizer and streaming `IncrementalDecoder`.
//! - `chat`: renders conversations with the model's Jinja chat template.
//! - `sampling`: `SamplingParams` (validated) and the seeded `Sampler`.
//! - `stop`: `StopMatcher`, stop strings over streamed text.

pub mod block_manager;
pub mod chat;
pub mod config;
pub mod error;
pub mod finish;
pub mod generate;
pub mod gguf;
pub mod kv_cache;
pub mod llm_engine;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod stop;
pub mod tokenizer;

pub use error::EngineError;
pub use finish::FinishReason;
pub use generate::{Choice, Engine, EngineConfig, Generation, Prompt};
