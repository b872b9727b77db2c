//! # tandem-decode-worker
//!
//! A Tandem worker process: the engine in the decode role (its KV cache lives in
//! a shared segment that the KV receiver writes prefill workers' blocks into),
//! in the prefill role (computing prompts and shipping their KV), or both.
//! Whatever the role, the worker serves `tandem.worker.v1.Worker` over gRPC,
//! with health and reflection, and registers itself in discovery.
//!
//! ## Layout
//! - `service`: the `Worker` gRPC service, one implementation for every role.
//! - `server`: `RunningWorker`: loads the model, starts the engine, the KV
//!   endpoints and the server, registers, and drains.
//! - `convert`: proto messages to and from the engine's types.
//! - `metrics`: the worker's metrics (load, prefix cache, KV transfer).
//! - `peers`: the decode workers discovery lists, the only places a prefill sends KV to.

pub mod convert;
pub mod metrics;
pub mod peers;
pub mod server;
pub mod service;

pub use server::{model_name_of, RunningWorker, WorkerConfig};
pub use service::{WorkerService, WorkerState};
