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
//! - `tcp`: `KvReceiver` and `KvSender` over TCP with persistent shared connections.
//! - `error`: `TransferError`, seen by both ends, with a `kind()` label.

pub mod error;
pub mod layout;
pub mod session;
pub mod sink;
pub mod tcp;
pub mod wire;

pub use error::TransferError;
pub use layout::{KvDtypeWire, KvLayout};
pub use session::{Arrived, Reservation};
pub use sink::{HostKv, KvSink};
pub use tcp::{KvReceiver, KvSender, SendSession, TcpConfig};
