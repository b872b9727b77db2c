//! The `Discovery` trait: how workers announce themselves and how routers follow them.
//!
//! Two handles carry the background work an implementation starts:
//! - `Registration` keeps one worker registered until it is deregistered (the record goes
//!   at once) or dropped (keep-alives stop; the record expires after its TTL, as after a crash).
//! - `DiscoveryEvents` is the stream of membership changes after a snapshot; dropping it
//!   stops its watcher, `close()` also waits for it.
//!
//! Both own a task that takes a cancellation token; `Discovery::shutdown` cancels and awaits
//! every task the discovery started. Implementations: `InMemoryDiscovery`, `EtcdDiscovery`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tandem_proto::ids::LeaseId;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::descriptor::{ClusterName, WorkerDescriptor, WorkerId};
use crate::error::DiscoveryError;

/// A boxed, sendable future: what the trait's methods return, so that `Arc<dyn Discovery>` works.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A change in the set of registered workers. Watchers see one worker per id: if an id
/// has records under two roles (it came back in another role before its old record
/// expired), the newest record is the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// The worker is registered with this descriptor. A repeat for a known id replaces
    /// the descriptor (the worker re-registered with new details).
    Added(WorkerDescriptor),
    /// No record of the worker is left: deregistered, or its lease expired.
    Removed(WorkerId),
}

/// Worker registration and membership watch. One implementation per backing store.
pub trait Discovery: Send + Sync {
    /// Registers `descriptor` in `cluster` and keeps it registered in the background.
    /// `ttl` is how long the record outlives its last keep-alive (rounded up to whole
    /// seconds, and to the store's minimum, by etcd). Fails if the first write fails.
    fn register(
        &self,
        cluster: &ClusterName,
        descriptor: WorkerDescriptor,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Registration, DiscoveryError>>;

    /// The workers of `cluster` now, and every change after that snapshot: applying
    /// the events in order to the snapshot gives the current set, with nothing missed.
    fn list_and_watch(
        &self,
        cluster: &ClusterName,
    ) -> BoxFuture<'_, Result<(Vec<WorkerDescriptor>, DiscoveryEvents), DiscoveryError>>;

    /// Stops every registration and watch this discovery started and waits for their
    /// tasks. Registrations are not removed (use `Registration::deregister` first for a
    /// graceful exit); event streams end. Later calls fail with `Shutdown`.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// Outcome of a registration task: `Ok` once it has stopped as asked.
pub(crate) type RegistrationTask = JoinHandle<Result<(), DiscoveryError>>;

/// What a registration task listens to.
#[derive(Clone)]
pub(crate) struct RegistrationSignals {
    /// Stop keep-alives and leave the record to expire (drop, or discovery shutdown).
    pub stop: CancellationToken,
    /// Remove the record now, then stop.
    pub deregister: CancellationToken,
}

/// Whether a registration's record is held, and by which lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// The record is held by this lease (etcd's lease id; a generation in memory).
    Held(LeaseId),
    /// The store said the lease is gone (it expired while the worker was cut off, or was
    /// revoked): the record went with it and routers dropped the worker. The worker should
    /// accept no new work (fence itself) until it holds a new lease.
    Lost,
}

/// A live registration. Drop it to stop keep-alives (the record then expires after its
/// TTL); call `deregister` to remove the record promptly.
#[must_use = "dropping a Registration stops its keep-alives"]
pub struct Registration {
    worker: WorkerId,
    signals: RegistrationSignals,
    task: Option<RegistrationTask>,
    /// How long `deregister` waits for the removal.
    deregister_deadline: Duration,
    lease: watch::Receiver<LeaseState>,
}

impl Registration {
    pub(crate) fn new(
        worker: WorkerId,
        signals: RegistrationSignals,
        task: RegistrationTask,
        deregister_deadline: Duration,
        lease: watch::Receiver<LeaseState>,
    ) -> Registration {
        Registration { worker, signals, task: Some(task), deregister_deadline, lease }
    }

    /// The registration's lease as it changes (`Lost` when the store dropped it, `Held`
    /// again once registered anew).
    pub fn lease(&self) -> watch::Receiver<LeaseState> {
        self.lease.clone()
    }

    pub fn worker(&self) -> &WorkerId {
        &self.worker
    }

    /// Removes the record now and waits (up to the implementation's deadline) until
    /// the store has done so. On error the record still expires after its TTL.
    pub async fn deregister(mut self) -> Result<(), DiscoveryError> {
        self.signals.deregister.cancel();
        let task = self.task.take().expect("task is taken only here");
        let after = self.deregister_deadline;
        match tokio::time::timeout(after, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(DiscoveryError::Task(join.to_string())),
            // Drop (right after) stops the task; the record expires after its TTL.
            Err(_) => Err(DiscoveryError::Timeout { op: "deregister", after }),
        }
    }

    /// True until the registration's task has stopped (after `Discovery::shutdown`, a
    /// panic, or a failed deregistration).
    pub fn is_active(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.signals.stop.cancel();
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").field("worker", &self.worker).finish_non_exhaustive()
    }
}

/// Membership changes after a `list_and_watch` snapshot, in order. Ends when the
/// discovery shuts down. Implements `futures_core::Stream`; `recv` needs no trait import.
pub struct DiscoveryEvents {
    rx: mpsc::UnboundedReceiver<DiscoveryEvent>,
    /// Cancels the watcher task when the stream is dropped.
    guard: Option<DropGuard>,
    task: Option<JoinHandle<()>>,
}

impl DiscoveryEvents {
    /// A stream fed directly by the discovery (no task of its own).
    pub(crate) fn from_channel(rx: mpsc::UnboundedReceiver<DiscoveryEvent>) -> DiscoveryEvents {
        DiscoveryEvents { rx, guard: None, task: None }
    }

    /// A stream fed by `task`, which stops when `cancel` fires.
    pub(crate) fn from_task(
        rx: mpsc::UnboundedReceiver<DiscoveryEvent>,
        cancel: CancellationToken,
        task: JoinHandle<()>,
    ) -> DiscoveryEvents {
        DiscoveryEvents { rx, guard: Some(cancel.drop_guard()), task: Some(task) }
    }

    /// The next event; `None` once the discovery has shut down.
    pub async fn recv(&mut self) -> Option<DiscoveryEvent> {
        self.rx.recv().await
    }

    /// An event if one is ready now.
    pub fn try_recv(&mut self) -> Option<DiscoveryEvent> {
        self.rx.try_recv().ok()
    }

    /// Stops the watcher and waits (up to `deadline`) for its task to end.
    pub async fn close(mut self, deadline: Duration) {
        if let Some(guard) = self.guard.take() {
            guard.disarm().cancel();
        }
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(deadline, task).await.is_err() {
                tracing::warn!(?deadline, "discovery watcher did not stop in time");
            }
        }
    }
}

impl futures_core::Stream for DiscoveryEvents {
    type Item = DiscoveryEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<DiscoveryEvent>> {
        self.rx.poll_recv(cx)
    }
}

impl std::fmt::Debug for DiscoveryEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryEvents").finish_non_exhaustive()
    }
}

/// Follows `cluster`'s membership until the future is dropped: `snapshot` gets every
/// fresh listing (the first, and again whenever the watch ends or listing failed, so a
/// follower can drop what left meanwhile), `event` every change after it. While discovery
/// is unreachable the follower keeps its last view; listing is retried with backoff
/// (100 ms doubling to 5 s).
pub async fn follow_members(
    discovery: std::sync::Arc<dyn Discovery>,
    cluster: ClusterName,
    mut snapshot: impl FnMut(Vec<WorkerDescriptor>),
    mut event: impl FnMut(DiscoveryEvent),
) {
    let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match discovery.list_and_watch(&cluster).await {
            Ok((listed, mut events)) => {
                backoff = crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
                snapshot(listed);
                while let Some(ev) = events.recv().await {
                    event(ev);
                }
                tracing::warn!("the membership watch ended; serving on the last view and listing again");
            }
            Err(e) => tracing::warn!(error = %e, "listing workers failed; serving on the last view"),
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}
