//! # tandem-text
//!
//! The text side of a model, without the compute kernels: what the router needs to check
//! and tokenize requests, and what the engine needs around its forward pass. It runs no
//! model and links no kernels.
//!
//! ## Layout
//! - `gguf`: reads GGUF files (bounds-checked; corrupt files are errors); tensor types stay raw GGML ids.
//! - `error`: `TextError`, with a `kind()` label.
//! - `config`: `ModelConfig`, the hyperparameters read from GGUF metadata.
//! - `tokenizer`: GGUF byte-level BPE tokenizer and streaming `IncrementalDecoder`.
//! - `chat`: renders conversations with the model's Jinja chat template.
//! - `prefix`: the prefix-cache hash scheme (`prefix_hashes`, `SCHEME`), shared by the engine
//!   that caches blocks and the router that looks them up.
//! - `prompt`: `Prompt` (text, chat or ids) and the ids the model sees (`prompt_ids`, `chat_ids`).
//! - `model_text`: `ModelText`, the one loader: opens the file, reads the config, builds the
//!   tokenizer and the chat template (and lets the engine load weights on the way).

pub mod chat;
pub mod config;
pub mod error;
pub mod gguf;
pub mod model_text;
pub mod prefix;
pub mod prompt;
pub mod tokenizer;

pub use error::TextError;
pub use model_text::ModelText;
pub use prompt::Prompt;
