//! # tandem-decode-worker
//!
//! Tandem's decode role: the engine's KV cache lives in a shared segment that
//! the KV receiver writes prefill workers' blocks into; `Reserve` holds blocks
//! for a prompt, and `Decode` streams its generation once the KV has arrived (or
//! prefills it here, on a worker of role `both` or to recompute a request whose
//! transfer failed). The engine actor, the `Worker` service and the process
//! around it are the runtime's (`tandem-worker-runtime`); this crate never sees
//! the prefill role.
//!
//! ## Layout
//! - `role`: `DecodeWorker`, the `Reserve` and `Decode` handlers
//!   (`DecodeWorker::build` is the role's `RoleBuilders` entry).
//! - `reservations`: `Reservations`, every reservation's life from `Reserve` to
//!   its stream or its end, and the quarantine of blocks a transfer may still write.
//! - `stream`: a request's engine events as `DecodeResponse`s.
//! - `migrate`: live migration's source side (`Migrate`): a running request's KV read
//!   from the shared segment and sent to another decode worker's reservation, and the
//!   signals that ask a request's router to move it.

mod migrate;
pub mod reservations;
pub mod role;
mod stream;

pub use reservations::{Reservations, ATTACH_DEADLINE, QUARANTINE};
pub use role::DecodeWorker;
