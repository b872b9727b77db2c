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
//! - `tokenizer`: GGUF byte-level BPE tokenizer and streaming `IncrementalDecoder`, built from
//!   `pretokenize` (the per-family word splitting of `tokenizer.ggml.pre`), `byte_level` (GPT-2's
//!   byte alphabet) and `incremental` (the streaming decoder).
//! - `chat`: renders conversations (messages, tools, tool calls) with the model's Jinja chat
//!   template, in an environment like Hugging Face's: `tojson` (Python's `json.dumps`), `pycompat`
//!   (Python string and dict methods), and `rendered` (client text kept from acting as markup).
//! - `guide`: constrained decoding: `Guide` (JSON Schema, JSON object, regex, choices, Lark
//!   grammar), compiled by `llguidance` for the vocabulary into a `Constraint` whose masks the
//!   sampler applies; the router compiles a guide once to refuse a bad one.
//! - `prefix`: the prefix-cache hash scheme (`prefix_hashes`, `SCHEME`), shared by the engine
//!   that caches blocks and the router that looks them up.
//! - `prompt`: `Prompt` (text, chat or ids) and the ids the model sees (`prompt_ids`, `chat_ids`).
//! - `model_text`: `ModelText`, the one loader: opens the file, reads the config, builds the
//!   tokenizer and the chat template (and lets the engine load weights on the way).

mod byte_level;
pub mod chat;
pub mod config;
pub mod error;
pub mod gguf;
pub mod guide;
mod incremental;
pub mod model_text;
pub mod prefix;
mod pretokenize;
pub mod prompt;
mod pycompat;
mod rendered;
mod tojson;
pub mod tokenizer;

pub use error::TextError;
pub use model_text::ModelText;
pub use prompt::Prompt;
pub use tokenizer::Tokenizer;
