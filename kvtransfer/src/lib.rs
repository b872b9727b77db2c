//! # tandem-kvtransfer
//!
//! Moves paged KV blocks from a prefill worker to a decode worker, layer by
//! layer, while the prefill is still computing.
//!
//! ## Layout
//! - `layout`: `KvLayout`, what both ends must agree on (checked in the handshake).
//! - `wire`: the frame codec of `PROTOCOL.md` (pure; bounded lengths; CRC32C).

pub mod layout;
pub mod wire;

pub use layout::{KvDtypeWire, KvLayout};
