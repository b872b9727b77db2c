//! The text side's error type. `kind()` is a stable, low-cardinality label; the engine's
//! `EngineError` wraps these errors and keeps their labels.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum TextError {
    /// The model file could not be read.
    #[error("{0}")]
    Io(String),
    /// The file is not a valid GGUF model (bad magic, truncated, corrupt, missing metadata).
    #[error("{0}")]
    BadModel(String),
    /// A valid file that uses something Tandem does not implement (architecture, tokenizer).
    #[error("{0}")]
    Unsupported(String),
    /// The prompt cannot be built (a chat for a model without a chat template).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Building or running the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Rendering the chat template failed.
    #[error("chat template: {0}")]
    Template(String),
}

impl TextError {
    /// A stable label for metrics and status mapping.
    pub fn kind(&self) -> &'static str {
        match self {
            TextError::Io(_) => "io",
            TextError::BadModel(_) => "bad_model",
            TextError::Unsupported(_) => "unsupported",
            TextError::InvalidRequest(_) => "invalid_request",
            TextError::Tokenizer(_) => "tokenizer",
            TextError::Template(_) => "template",
        }
    }
}
