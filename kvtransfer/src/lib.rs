//! # tandem-kvtransfer
//!
//! Moves paged KV blocks from a prefill worker to a decode worker, layer by
//! layer, while the prefill is still computing.
//!
//! ## Layout
//! - `layout`: `KvLayout`, what both ends must agree on (checked in the handshake).
//! - `wire`: the frame codec of `PROTOCOL.md` (pure; bounded lengths; CRC32C).
//! - `sink`: `KvSink`, the receiving worker's block memory, written in place.
//! - `session`: the receiver's reservations (leases with deadlines) and their outcomes.
//! - `tcp`: `KvReceiver` and `KvSender` over TCP with persistent shared connections, and the
//!   same frames over a Unix socket when both ends share a host (`listen_shm`, `open_target`).
//! - `shm`: the receiver's blocks in a shared-memory segment that same-host senders write in place.
//! - `error`: `TransferError`, seen by both ends, with a `kind()` label.

pub mod error;
pub mod layout;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod session;
pub mod shm;
pub mod sink;
pub mod tcp;
pub mod wire;

pub use error::TransferError;
pub use layout::{KvDtypeWire, KvLayout};
pub use session::{Arrived, Reservation};
pub use shm::{host_id, ShmKv};
pub use sink::{HostKv, KvSink};
pub use tcp::{KvReceiver, KvSender, KvTarget, LocalTarget, SendSession, TcpConfig};
