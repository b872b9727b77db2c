//! The engine's error type. `kind()` is a stable, low-cardinality label that
//! front doors map to status codes and metrics use as a label.

use tandem_text::TextError;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum EngineError {
    /// The model file is not there, or the engine thread is gone.
    #[error("{0}")]
    Io(String),
    /// The weights do not match the model's config (a tensor missing or of the wrong shape).
    #[error("{0}")]
    BadModel(String),
    /// A tensor of a GGML type the kernels do not compute with.
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
    /// The text side failed: reading the file, its metadata, the tokenizer or the chat
    /// template. Shown and labelled as the text side's error.
    #[error(transparent)]
    Text(TextError),
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
            EngineError::Text(e) => e.kind(),
        }
    }
}

/// A prompt the text side refuses is a request fault like any other (`InvalidRequest`, which
/// front doors map to a client error); every other text error stays the text side's.
impl From<TextError> for EngineError {
    fn from(e: TextError) -> Self {
        match e {
            TextError::InvalidRequest(m) => EngineError::InvalidRequest(m),
            other => EngineError::Text(other),
        }
    }
}
