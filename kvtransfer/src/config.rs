//! Settings of the KV transfer endpoints.

/// Settings shared by both ends.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Largest frame body accepted or sent.
    pub max_frame: usize,
    /// Largest KV payload per Blocks frame (a layer's blocks are split into frames of at most this).
    pub chunk_bytes: usize,
    /// Frames queued per connection before senders wait.
    pub queue_frames: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig { max_frame: 64 << 20, chunk_bytes: 4 << 20, queue_frames: 64 }
    }
}
