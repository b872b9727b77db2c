//! Why a worker did not start.

use std::path::PathBuf;

use tandem_cluster::Role;

/// A worker's start failed; nothing of it keeps running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot work: the worker id, the block size, the advertised host.
    #[error("{0}")]
    Config(String),
    #[error("model file {} does not exist (scripts/fetch-model.sh fetches the default model)", .0.display())]
    ModelMissing(PathBuf),
    /// The TLS files, or the gRPC server's TLS configuration.
    #[error("{0}")]
    Tls(String),
    /// Loading the model or its tokenizer, or building the engine and its KV cache.
    #[error("{0}")]
    Load(String),
    /// Binding or listening on one of the worker's sockets.
    #[error("{0}")]
    Listen(String),
    /// The worker's role needs a role the caller did not build it with.
    #[error("worker {id} ({role}) needs the {missing} role, which it was not built with")]
    MissingRole { id: String, role: Role, missing: &'static str },
}

impl StartError {
    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StartError::Config(_) => "config",
            StartError::ModelMissing(_) => "model_missing",
            StartError::Tls(_) => "tls",
            StartError::Load(_) => "load",
            StartError::Listen(_) => "listen",
            StartError::MissingRole { .. } => "missing_role",
        }
    }
}
