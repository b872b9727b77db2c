//! Errors of discovery. `kind()` is a short stable label for metrics and logs.

use std::time::Duration;

use crate::etcd::EtcdError;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A cluster name or worker id that cannot be a key segment.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName { what: &'static str, value: String, reason: &'static str },
    /// Some other argument out of range (a zero TTL, no endpoints).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// etcd could not be reached (connection refused or lost).
    #[error("etcd unavailable during {op}: {source}")]
    Unavailable {
        op: &'static str,
        #[source]
        source: EtcdError,
    },
    /// etcd answered with an error.
    #[error("etcd {op} failed: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: EtcdError,
    },
    /// A request to etcd got no answer before its deadline.
    #[error("etcd {op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// A stored worker record that does not decode, or disagrees with its key.
    #[error("malformed worker record at {key}: {reason}")]
    Malformed { key: String, reason: String },
    #[error("cannot encode worker descriptor: {0}")]
    Encode(#[source] serde_json::Error),
    /// The discovery was shut down; it starts nothing new.
    #[error("discovery is shut down")]
    Shutdown,
    /// A background task panicked.
    #[error("discovery task failed: {0}")]
    Task(String),
}

impl DiscoveryError {
    pub fn kind(&self) -> &'static str {
        match self {
            DiscoveryError::InvalidName { .. } | DiscoveryError::InvalidArgument(_) => "invalid_argument",
            DiscoveryError::Unavailable { .. } => "unavailable",
            DiscoveryError::Etcd { .. } => "etcd",
            DiscoveryError::Timeout { .. } => "timeout",
            DiscoveryError::Malformed { .. } => "malformed",
            DiscoveryError::Encode(_) => "encode",
            DiscoveryError::Shutdown => "shutdown",
            DiscoveryError::Task(_) => "task",
        }
    }

    /// Classifies an etcd call's error: failures to reach etcd are `Unavailable`
    /// (worth retrying), its refusals `Etcd`.
    pub(crate) fn etcd(op: &'static str, source: EtcdError) -> DiscoveryError {
        if source.is_unavailable() {
            DiscoveryError::Unavailable { op, source }
        } else {
            DiscoveryError::Etcd { op, source }
        }
    }
}
