//! Settings of the KV transfer endpoints.

use std::time::Duration;

use crate::auth::KvAuth;
use tandem_proto::tls::MutualTls;

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
    /// The cluster's key: a sender signs its Hello with it, a receiver refuses a Hello
    /// that is not signed with it (on TCP and on the same-host socket alike). `None`:
    /// Hellos are neither signed nor checked.
    pub auth: Option<KvAuth>,
    /// Receiver: a connection silent this long between frames is closed. No session
    /// outlives its lease (at most a minute), so a longer silence holds nothing. A sender
    /// stops reusing a connection idle for half of this (so it never picks one the
    /// receiver is about to close).
    pub idle_timeout: Duration,
    /// Receiver: once a frame's header has arrived, its whole body must arrive within this.
    pub frame_timeout: Duration,
    /// Receiver: connections served at once, per listener; more are closed at accept.
    pub max_conns: usize,
    /// Receiver: connections served at once from one peer IP address (TCP).
    pub max_conns_per_ip: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_frame: 64 << 20,
            chunk_bytes: 4 << 20,
            queue_frames: 64,
            tls: None,
            auth: None,
            idle_timeout: Duration::from_secs(120),
            frame_timeout: Duration::from_secs(30),
            max_conns: 256,
            max_conns_per_ip: 32,
        }
    }
}
