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
//! - `receiver`: `KvReceiver`, the decode side: reservations, frames read straight into blocks
//!   (TCP, and a Unix socket with a shared segment for same-host senders: `listen_shm`).
//! - `sender`: `KvSender`, the prefill side: persistent shared connections, backpressure,
//!   same-host shared memory chosen automatically (`open_target`).
//! - `config`: `TcpConfig`, limits, queue sizes and TLS for both ends.
//! - TLS: `TcpConfig::tls` takes the cluster's `tandem_proto::tls::MutualTls`.
//!
//! Ids: requests are `tandem_proto::ids::ClusterRequestId`, blocks `tandem_kernels::BlockId`,
//! a sender's discovery lease `Option<tandem_proto::ids::LeaseId>`; the wire codec alone
//! turns them into the frames' integers.
//! - `shm`: the receiver's blocks in a shared-memory segment that same-host senders write in place.
//! - `error`: `TransferError`, seen by both ends, with a `kind()` label.
//! - `nccl` (feature `cuda`): a GPU-to-GPU transport over NCCL, compiled and unit-tested
//!   but not wired to any worker (its module doc says what a caller would have to add).

pub mod auth;
pub mod config;
pub mod error;
pub mod layout;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod receiver;
pub mod sender;
pub mod session;
pub mod shm;
pub mod sink;
pub mod wire;

pub use auth::KvAuth;
pub use config::TcpConfig;
pub use error::TransferError;
pub use layout::{KvDtypeWire, KvLayout};
pub use receiver::KvReceiver;
pub use sender::{BufferPool, KvSender, KvTarget, LocalTarget, Renewer, SendSession};
pub use session::{Arrived, Reservation};
pub use shm::{host_id, ShmKv};
pub use sink::{HostKv, KvSink};
