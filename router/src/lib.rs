//! # tandem-router
//!
//! Tandem's front door. It serves the public `tandem.v1.Generate` API over gRPC
//! (with health and reflection), checks and tokenizes each request, picks a
//! prefill worker and a decode worker through a [`policy::RoutingPolicy`],
//! reserves the prompt's KV blocks on the decode worker, has the prefill worker
//! compute the prompt and ship its KV there, and relays the decode worker's
//! stream to the client. With no prefill worker, a decode worker of role
//! `both` serves the whole request (aggregated serving). One router serves several
//! models: each request goes to the workers of the model it names.
//!
//! ## Layout
//! - `models`: the models served (`ServedModels`): a request's `model` to its facts, the
//!   default for none, NOT_FOUND for a name not served.
//! - `validate`: request checks, defaults, tokenization (`ModelFacts`).
//! - `keys`: API keys and the tenants they name (`Tenant`).
//! - `salt`: the keyed prefix-cache salt that keeps tenants' caches apart (`SaltKey`).
//! - `quota`: per-tenant limits on requests in flight.
//! - `admission`: who may come in: the in-flight limit, the tenants' quotas, draining,
//!   overload answers (`Admission`, `Permit`).
//! - `state`: `RouterState`, what the handlers share.
//! - `policy`: `RoutingPolicy`, `CacheAware`, `LeastLoaded`, `RoundRobin`.
//! - `placement`: per-request disaggregation: whether a decode worker that can prefill
//!   (role `both`) computes a prompt itself, and the controller that moves its budget
//!   with observed TTFT and TPOT (`PlacementControl`).
//! - `planner`: the prefill/decode split: flips elastic workers' roles as the load moves,
//!   and publishes the split it wants per role (`Planner`).
//! - `index`: `PrefixIndex`, which worker caches which blocks (a pure data structure);
//!   `follow`: each worker's KV event stream into it (snapshot, gaps, resubscribing).
//! - `worker`: `WorkerApi`, what a request asks of a worker, and its gRPC implementation.
//! - `members`: membership from discovery, worker clients, load polling, the prefix
//!   index, hash parity, placement (`route`).
//! - `routing`: `Routing`, what every choice shares (members, policy, recovery limits,
//!   the wait for KV room).
//! - `choice`: one choice's path across workers (`ChoiceRun`), its attempts and their
//!   recovery. `choice_tests`: its table tests, over fake workers.
//! - `recovery`: what a choice does after a failed attempt (migration, the KV
//!   failure policies `fail`, `recompute`, `retry`), and whose fault a failure was.
//! - `relay`: one request from admission to its last chunk: its choices run, their
//!   chunks relayed to the client with timing and usage.
//! - `stall`: the bound on a client that stops reading its stream.
//! - `ids`: random public and worker request ids.
//! - `service`: the `Generate` gRPC handlers.
//! - `openai`, `http`: the OpenAI-compatible HTTP front door (axum), translated to
//!   and from `tandem.v1` and started through the same path as a gRPC request.
//! - `structured`, `tools`: structured output (the OpenAI fields that make a guide) and tool
//!   calling (tools, `tool_choice` as a guide, calls parsed out of the model's text).
//! - `metrics`, `telemetry`: the router's metrics and the process's Prometheus recorder.
//! - `server`: `RunningRouter`: start (`StartError`), serve, drain.
//!
//! Modules depend one way: `service`, `http` -> `relay` -> `choice` -> `routing` ->
//! `members` -> {`worker`, `index`, `follow`}; `relay` -> `state` -> {`models`, `routing`, `admission`};
//! nothing below calls back up.

pub mod admission;
pub mod choice;
#[cfg(test)]
mod choice_tests;
pub mod fairness;
mod follow;
pub mod http;
pub mod ids;
pub mod index;
pub mod keys;
pub(crate) mod live;
pub mod members;
pub mod metrics;
pub mod models;
#[cfg(test)]
mod models_tests;
pub mod openai;
pub mod pick;
pub mod placement;
pub mod planner;
pub mod policy;
pub mod predict;
pub mod quota;
pub mod recovery;
pub mod relay;
pub mod routing;
pub mod salt;
pub mod server;
pub mod service;
pub mod slo;
pub mod stall;
pub mod state;
pub mod structured;
pub mod telemetry;
pub mod tools;
pub mod validate;
pub mod worker;

pub use models::ModelSpec;
pub use server::{RouterConfig, RunningRouter, StartError};
