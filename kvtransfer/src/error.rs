//! Errors of a transfer session. Both ends see one; `kind()` is a metric label.

use tandem_proto::ids::ClusterRequestId;

use crate::wire::Code;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// The session's deadline passed (also: a receiver's lease expired).
    #[error("deadline passed: {0}")]
    Deadline(String),
    /// The connection closed or failed mid-session.
    #[error("peer gone: {0}")]
    PeerGone(String),
    #[error("checksum mismatch: {0}")]
    Checksum(String),
    #[error("unknown request {0} (no reservation, or it expired)")]
    UnknownRequest(ClusterRequestId),
    /// The two ends disagree on the KV layout or the model.
    #[error("{0}")]
    LayoutMismatch(String),
    #[error("aborted: {0}")]
    Aborted(String),
    /// A block id outside the request's reservation.
    #[error("bad block: {0}")]
    BadBlock(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("i/o error: {0}")]
    Io(String),
    /// The frame came over a connection whose sender holds another discovery lease than
    /// the one the reservation expects: a fenced or replaced worker.
    #[error("stale sender: {0}")]
    StaleSender(String),
    /// The TLS handshake failed: a certificate was refused, or the peer does not speak TLS.
    #[error("TLS: {0}")]
    Tls(String),
    /// The peer did not prove it holds the cluster's secret (its Hello's tag).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
}

impl TransferError {
    pub fn kind(&self) -> &'static str {
        match self {
            TransferError::Deadline(_) => "deadline",
            TransferError::PeerGone(_) => "peer_gone",
            TransferError::Checksum(_) => "checksum",
            TransferError::UnknownRequest(_) => "unknown_request",
            TransferError::LayoutMismatch(_) => "layout_mismatch",
            TransferError::Aborted(_) => "aborted",
            TransferError::BadBlock(_) => "bad_block",
            TransferError::Protocol(_) => "protocol",
            TransferError::Io(_) => "io",
            TransferError::Tls(_) => "tls",
            TransferError::StaleSender(_) => "stale_sender",
            TransferError::Unauthenticated(_) => "unauthenticated",
        }
    }

    /// The wire code that tells the peer about this error.
    pub fn code(&self) -> Code {
        match self {
            TransferError::Deadline(_) => Code::Deadline,
            TransferError::Checksum(_) => Code::Checksum,
            TransferError::UnknownRequest(_) => Code::UnknownRequest,
            TransferError::LayoutMismatch(_) => Code::LayoutMismatch,
            TransferError::Aborted(_) => Code::Aborted,
            TransferError::BadBlock(_) => Code::BadBlock,
            TransferError::StaleSender(_) => Code::StaleSender,
            TransferError::Unauthenticated(_) => Code::Unauthenticated,
            _ => Code::Protocol,
        }
    }

    /// The error a peer's code stands for.
    pub fn from_code(code: Code, request_id: ClusterRequestId, message: String) -> TransferError {
        match code {
            Code::Deadline => TransferError::Deadline(message),
            Code::Checksum => TransferError::Checksum(message),
            Code::UnknownRequest => TransferError::UnknownRequest(request_id),
            Code::LayoutMismatch => TransferError::LayoutMismatch(message),
            Code::Aborted => TransferError::Aborted(message),
            Code::BadBlock => TransferError::BadBlock(message),
            Code::StaleSender => TransferError::StaleSender(message),
            Code::Unauthenticated => TransferError::Unauthenticated(message),
            Code::Ok | Code::Protocol => TransferError::Protocol(message),
        }
    }
}

impl From<std::io::Error> for TransferError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => TransferError::PeerGone(e.to_string()),
            _ => TransferError::Io(e.to_string()),
        }
    }
}
