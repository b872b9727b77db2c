//! # tandem-router
//!
//! Tandem's front door. It serves the public `tandem.v1.Generate` API over gRPC
//! (with health and reflection), checks and tokenizes each request, picks a
//! prefill worker and a decode worker through a [`policy::RoutingPolicy`],
//! reserves the prompt's KV blocks on the decode worker, has the prefill worker
//! compute the prompt and ship its KV there, and relays the decode worker's
//! stream to the client. With no prefill worker, a decode worker of role
//! `both` serves the whole request (aggregated serving).
//!
//! ## Layout
//! - `validate`: request checks, defaults, tokenization (`ModelFacts`).
//! - `policy`: `RoutingPolicy`, `RoundRobin`, `LeastLoaded`.
//! - `members`: membership from discovery, worker clients, load polling, KV events.
//! - `service`: the `Generate` service: one request's path through the cluster.
//! - `salt`: the keyed prefix-cache salt that keeps tenants' caches apart (`SaltKey`).
//! - `quota`: per-tenant limits on requests in flight.
//! - `stall`: the bound on a client that stops reading its stream.
//! - `choice`: one choice's path across workers, its attempts and their recovery.
//! - `recovery`: what a choice does after a failed attempt (migration, the KV
//!   failure policies `fail`, `recompute`, `retry`).
//! - `openai`, `http`: the OpenAI-compatible HTTP front door (axum), translated to
//!   and from `tandem.v1` and started through the same path as a gRPC request.
//! - `metrics`, `telemetry`: the router's metrics and the process's Prometheus recorder.
//! - `server`: `RunningRouter`: start, serve, drain.

pub mod choice;
pub mod http;
pub mod members;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod quota;
pub mod recovery;
pub mod salt;
pub mod server;
pub mod service;
pub mod stall;
pub mod telemetry;
pub mod validate;

pub use server::{RouterConfig, RunningRouter};
