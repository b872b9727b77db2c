//! # tandem-worker-runtime
//!
//! What every Tandem worker shares, whatever its role: the engine on its own
//! thread, the `tandem.worker.v1` service that answers for the worker and
//! delegates `Prefill` to a prefill role and `Reserve`/`Decode` to a decode
//! role, and the process shell (model loading, KV endpoints, serving,
//! registration, drain, stats, metrics). The roles live in their own crates
//! (`tandem-prefill-worker`, `tandem-decode-worker`), which never import each
//! other; a worker of role `both` is built with both by a caller that sees
//! them (`RoleBuilders`).
//!
//! ## Layout
//! - `actor`: `EngineHandle`, the engine on its own thread behind a message queue.
//! - `service`: the `Worker` gRPC service and the role traits it delegates to.
//! - `state`: `WorkerState`, what the roles and the shell share (draining, fenced,
//!   in flight, active requests, tombstones).
//! - `server`: `RunningWorker`: loads the model, starts the engine, the KV
//!   endpoints, the roles and the server, registers, and drains.
//! - `registration`: registering in discovery, and fencing while the lease is lost.
//! - `role_switch`: `SetRole`, an elastic worker's role changed while it runs (drain,
//!   leave discovery, register again under the new role).
//! - `config`: `WorkerConfig`. `error`: `StartError`.
//! - `convert`: proto messages to and from the engine's types.
//! - `metrics`: the worker's metrics (load, prefix cache, KV transfer).
//! - `peers`: the cluster's decode workers as discovery lists them: the only places KV
//!   leaves a worker for (a prefill's, a live migration's).

pub mod actor;
pub mod config;
pub mod convert;
pub mod error;
pub mod metrics;
pub mod peers;
mod registration;
pub mod role_switch;
pub mod server;
pub mod service;
pub mod state;

pub use actor::{Admission, Admitted, EngineHandle, Event, ExportSink, Load};
pub use config::{model_name_of, WorkerConfig};
pub use convert::kv_layout;
pub use error::StartError;
pub use server::{BuildDecode, BuildPrefill, RoleBuilders, RoleContext, RunningWorker};
pub use service::{DecodeRole, DecodeStream, PrefillRole, Roles, WorkerService};
pub use state::{Active, InFlight, WorkerParts, WorkerState, MAX_LEASE};
