//! `FinishReason`: why a sequence ended, the one word for it from the scheduler
//! to the client.
//!
//! The scheduler decides `Stop` (a stop token id, EOS among them) and `Length`
//! (`max_tokens`, the context, the pool); the engine loop decides `Stop` on a stop
//! string and `Abort` when a request is cancelled; `generate` hands it to its
//! caller in each `Choice`. It has a module of its own because all three layers
//! name it and none of them owns it: the scheduler decides two of its values and
//! the loop the third, and a worker that reads a `SeqOutput` should not have to
//! reach into the scheduler for its type. The proto's enum is not this one: the
//! decode worker maps to it at its edge, and the engine never sees prost types.

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
    /// Cancelled: the client left, or the request was aborted.
    Abort,
}

impl FinishReason {
    /// The OpenAI-style word (`stop`, `length`, `abort`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}
