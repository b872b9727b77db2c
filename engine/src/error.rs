//! The engine's error type. `kind()` is a stable, low-cardinality label that
//! front doors map to status codes and metrics use as a label.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum EngineError {
    /// The model file could not be read.
    #[error("{0}")]
    Io(String),
    /// The file is not a valid GGUF model (bad magic, truncated, corrupt, missing tensors).
    #[error("{0}")]
    BadModel(String),
    /// A valid file that uses something this engine does not implement (architecture, tensor type).
    #[error("{0}")]
    Unsupported(String),
    /// The request itself is invalid (empty prompt, too long, bad sampling parameters).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Too many requests are waiting; try again later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The KV block pool cannot hold the request.
    #[error("out of KV cache blocks: {0}")]
    OutOfBlocks(String),
    /// Building or running the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Rendering the chat template failed.
    #[error("chat template: {0}")]
    Template(String),
}

impl EngineError {
    /// A stable label for metrics and status mapping.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::Io(_) => "io",
            EngineError::BadModel(_) => "bad_model",
            EngineError::Unsupported(_) => "unsupported",
            EngineError::InvalidRequest(_) => "invalid_request",
            EngineError::OutOfBlocks(_) => "out_of_blocks",
            EngineError::Overloaded(_) => "overloaded",
            EngineError::Tokenizer(_) => "tokenizer",
            EngineError::Template(_) => "template",
        }
    }
}
