//! Settings of the KV transfer endpoints.

use crate::tls::MutualTls;

/// Settings shared by both ends.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Largest frame body accepted or sent.
    pub max_frame: usize,
    /// Largest KV payload per Blocks frame (a layer's blocks are split into frames of at most this).
    pub chunk_bytes: usize,
    /// Frames queued per connection before senders wait.
    pub queue_frames: usize,
    /// Mutual TLS on TCP connections: the receiver requires a client certificate from the
    /// CA, the sender verifies the receiver's. `None`: plaintext. The same-host Unix socket
    /// stays plaintext either way (it never leaves the host; its file is the owner's alone).
    pub tls: Option<MutualTls>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig { max_frame: 64 << 20, chunk_bytes: 4 << 20, queue_frames: 64, tls: None }
    }
}
