//! `EtcdDiscovery`: discovery through etcd leases and watches, for workers in
//! separate processes and on separate machines.
//!
//! - A registration is a lease (its TTL) and one key put with it. A task renews the
//!   lease every TTL/3 (`registration`); if the lease is lost it grants a new one and
//!   puts the key again, retrying with backoff until told to stop.
//! - A watch lists the prefix, then watches it from the revision after the list, so no
//!   change falls between. When the stream breaks the task keeps its last view, and on
//!   reconnection lists again and reports only the difference (`watch`).
//!
//! Every request has a deadline (`EtcdConfig::request_timeout`); every task takes a
//! cancellation token and is tracked, so `shutdown` awaits them all.

pub mod client;
mod registration;
mod watch;

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::descriptor::{workers_prefix, ClusterName, WorkerDescriptor};
use crate::discovery::{BoxFuture, Discovery, DiscoveryEvents, Registration};
use crate::error::DiscoveryError;
use crate::members::Members;
pub use client::{EtcdClient, EtcdError};

/// How to reach etcd and how patiently. `Default` is a local etcd on its usual port.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Deadline for opening a connection.
    pub connect_timeout: Duration,
    /// Deadline for each request (grant, put, get, revoke) and for opening a stream.
    pub request_timeout: Duration,
    /// HTTP/2 pings on idle connections find a dead etcd that never closed the socket.
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// First and longest wait between retries.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for EtcdConfig {
    fn default() -> EtcdConfig {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(3),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
        }
    }
}

/// Discovery backed by etcd. Cheap to clone: clones share the connection and tasks.
#[derive(Clone)]
pub struct EtcdDiscovery {
    client: EtcdClient,
    config: EtcdConfig,
    root: CancellationToken,
    tasks: TaskTracker,
}

impl EtcdDiscovery {
    /// Sets up a client for `config.endpoints`. Connections are opened on first use,
    /// so this succeeds while etcd is down; requests then fail (and tasks retry).
    pub async fn connect(config: EtcdConfig) -> Result<EtcdDiscovery, DiscoveryError> {
        if config.endpoints.is_empty() {
            return Err(DiscoveryError::InvalidArgument("no etcd endpoints".into()));
        }
        let client = EtcdClient::new(&config).map_err(|e| DiscoveryError::InvalidArgument(e.to_string()))?;
        Ok(EtcdDiscovery { client, config, root: CancellationToken::new(), tasks: TaskTracker::new() })
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    fn check_open(&self) -> Result<(), DiscoveryError> {
        if self.root.is_cancelled() {
            Err(DiscoveryError::Shutdown)
        } else {
            Ok(())
        }
    }

    async fn register_impl(
        &self,
        cluster: ClusterName,
        descriptor: WorkerDescriptor,
        ttl: Duration,
    ) -> Result<Registration, DiscoveryError> {
        self.check_open()?;
        registration::register(self, &cluster, descriptor, ttl).await
    }

    async fn list_and_watch_impl(
        &self,
        cluster: ClusterName,
    ) -> Result<(Vec<WorkerDescriptor>, DiscoveryEvents), DiscoveryError> {
        self.check_open()?;
        let prefix = workers_prefix(&cluster);
        let client = self.client.clone();
        let (records, revision) = watch::list(&client, &prefix, self.config.request_timeout).await?;
        let members = Members::from_records(records);
        let snapshot = members.current().cloned().collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = self.root.child_token();
        let watcher = watch::Watcher::new(client, prefix, members, tx, cancel.clone(), self.config.clone());
        let task = self.tasks.spawn(watcher.run(revision));
        Ok((snapshot, DiscoveryEvents::from_task(rx, cancel, task)))
    }
}

impl Discovery for EtcdDiscovery {
    fn register(
        &self,
        cluster: &ClusterName,
        descriptor: WorkerDescriptor,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Registration, DiscoveryError>> {
        Box::pin(self.register_impl(cluster.clone(), descriptor, ttl))
    }

    fn list_and_watch(
        &self,
        cluster: &ClusterName,
    ) -> BoxFuture<'_, Result<(Vec<WorkerDescriptor>, DiscoveryEvents), DiscoveryError>> {
        Box::pin(self.list_and_watch_impl(cluster.clone()))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.root.cancel();
            self.tasks.close();
            self.tasks.wait().await;
        })
    }
}

impl std::fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDiscovery").field("endpoints", &self.config.endpoints).finish_non_exhaustive()
    }
}

/// Runs an etcd request with a deadline, classifying its error.
async fn deadline<T>(
    op: &'static str,
    after: Duration,
    request: impl Future<Output = Result<T, EtcdError>>,
) -> Result<T, DiscoveryError> {
    match tokio::time::timeout(after, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(DiscoveryError::etcd(op, e)),
        Err(_) => Err(DiscoveryError::Timeout { op, after }),
    }
}
