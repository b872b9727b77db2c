//! # tandem-engine
//!
//! The model runtime both worker kinds run.
//!
//! ## Layout
//! - `gguf`: reads GGUF files (bounds-checked; corrupt files are errors).
//! - `error`: `EngineError`, with a `kind()` label.

pub mod error;
pub mod gguf;

pub use error::EngineError;
