//! # tandem-cluster
//!
//! How Tandem's workers find each other. A worker registers a `WorkerDescriptor` (its
//! role, addresses, model and KV geometry) with a TTL; a router lists the workers and
//! follows every change, and keeps them in a `ClusterView` to choose from. Records live
//! under `/tandem/<cluster>/workers/<role>/<id>`.
//!
//! This crate knows nothing of the engine, the KV transport or gRPC: it only says who
//! is there and how to reach them.
//!
//! ## Layout
//! - `descriptor`: `WorkerDescriptor`, `WorkerId`, `ClusterName`, `Role`, and the key layout.
//! - `discovery`: the `Discovery` trait (`register`, `list_and_watch`, `shutdown`),
//!   `DiscoveryEvent` (`Added` / `Removed`), and the handles `Registration` and `DiscoveryEvents`.
//! - `memory`: `InMemoryDiscovery`, the single-machine default; TTLs on tokio's clock.
//! - `etcd`: `EtcdDiscovery`: leases with keep-alives, list-then-watch, resync after outages.
//!   `etcd::client` is the small etcd v3 client under it, generated from `proto/etcd.proto`
//!   (the subset of etcd's API that discovery uses) with the vendored protoc.
//! - `members`: the per-cluster record set both implementations keep (one worker per id).
//! - `view`: `ClusterView`, the pure current set by role that the router queries.
//! - `backoff`: retry pacing for the etcd tasks.
//! - `error`: `DiscoveryError`, with a `kind()` label.

mod backoff;
pub mod descriptor;
pub mod discovery;
pub mod error;
pub mod etcd;
mod members;
pub mod memory;
pub mod view;

pub use descriptor::{ClusterName, KvEndpoints, LocalKvEndpoint, ModelInfo, Role, WorkerDescriptor, WorkerId};
pub use discovery::{follow_members, BoxFuture, Discovery, DiscoveryEvent, DiscoveryEvents, LeaseState, Registration};
pub use error::DiscoveryError;
pub use etcd::{EtcdClient, EtcdConfig, EtcdDiscovery, EtcdError};
pub use memory::InMemoryDiscovery;
pub use view::{ClusterView, ViewChange};
