//! `InMemoryDiscovery`: discovery inside one process, the single-machine default
//! (`tandem up`) and the fast double for tests.
//!
//! It owns a map of records per cluster and the senders of every watch. TTLs follow
//! tokio's clock (so `tokio::time::pause()` drives them): a dropped `Registration`'s
//! record goes `ttl` after the drop, like an etcd lease whose keep-alives stopped.
//! A live registration never expires: in one process, alive means alive. The lock is
//! a std mutex never held across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tandem_proto::ids::LeaseId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::descriptor::{worker_key, ClusterName, WorkerDescriptor};
use crate::discovery::{
    BoxFuture, Discovery, DiscoveryEvent, DiscoveryEvents, LeaseState, Registration, RegistrationSignals,
};
use crate::error::DiscoveryError;
use crate::members::{Members, Record};

/// In-process discovery. Cheap to clone: clones share the same records.
#[derive(Clone, Default)]
pub struct InMemoryDiscovery {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    root: CancellationToken,
    tasks: TaskTracker,
}

/// A registration's generation as its lease: generations count from 1.
fn generation_lease(generation: i64) -> LeaseId {
    LeaseId::from_wire(generation).expect("generations start at 1")
}

#[derive(Default)]
struct State {
    closed: bool,
    /// Tells a record from a later one under the same key, so an old registration's
    /// expiry or deregistration never removes its replacement; also orders records.
    next_generation: i64,
    clusters: HashMap<ClusterName, ClusterState>,
}

#[derive(Default)]
struct ClusterState {
    /// By key (`worker_key`), as in etcd; the record's revision is its generation.
    members: Members,
    watchers: Vec<mpsc::UnboundedSender<DiscoveryEvent>>,
}

impl ClusterState {
    fn broadcast(&mut self, event: Option<DiscoveryEvent>) {
        if let Some(event) = event {
            self.watchers.retain(|tx| tx.send(event.clone()).is_ok());
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes the record at `key` if it is still the one of `generation`.
    fn remove(&self, cluster: &ClusterName, key: &str, generation: i64) {
        let mut state = self.lock();
        let Some(c) = state.clusters.get_mut(cluster) else {
            return;
        };
        if c.members.record(key).is_some_and(|r| r.revision == generation) {
            let event = c.members.delete(key);
            c.broadcast(event);
        }
    }
}

impl InMemoryDiscovery {
    pub fn new() -> InMemoryDiscovery {
        InMemoryDiscovery::default()
    }

    async fn register_impl(
        &self,
        cluster: ClusterName,
        descriptor: WorkerDescriptor,
        ttl: Duration,
    ) -> Result<Registration, DiscoveryError> {
        if ttl.is_zero() {
            return Err(DiscoveryError::InvalidArgument("registration ttl must be positive".into()));
        }
        let key = worker_key(&cluster, descriptor.role, &descriptor.id);
        let worker = descriptor.id.clone();
        let generation = {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(DiscoveryError::Shutdown);
            }
            state.next_generation += 1;
            let generation = state.next_generation;
            let c = state.clusters.entry(cluster.clone()).or_default();
            let descriptor = WorkerDescriptor { lease: Some(generation_lease(generation)), ..descriptor };
            let event = c.members.put(key.clone(), Record { descriptor, revision: generation });
            c.broadcast(event);
            generation
        };
        let signals =
            RegistrationSignals { stop: self.shared.root.child_token(), deregister: CancellationToken::new() };
        let task = self.shared.tasks.spawn(keep_registered(
            self.shared.clone(),
            cluster,
            key,
            generation,
            ttl,
            signals.clone(),
        ));
        // A record in memory never loses its lease while registered.
        let (_, lease) = tokio::sync::watch::channel(LeaseState::Held(generation_lease(generation)));
        Ok(Registration::new(worker, signals, task, Duration::from_secs(1), lease))
    }

    fn list_and_watch_impl(
        &self,
        cluster: &ClusterName,
    ) -> Result<(Vec<WorkerDescriptor>, DiscoveryEvents), DiscoveryError> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(DiscoveryError::Shutdown);
        }
        let c = state.clusters.entry(cluster.clone()).or_default();
        let snapshot = c.members.current().cloned().collect();
        let (tx, rx) = mpsc::unbounded_channel();
        c.watchers.push(tx);
        Ok((snapshot, DiscoveryEvents::from_channel(rx)))
    }
}

/// The registration's task: waits to be deregistered (remove now) or stopped (remove
/// after `ttl`, unless the whole discovery is shutting down).
async fn keep_registered(
    shared: Arc<Shared>,
    cluster: ClusterName,
    key: String,
    generation: i64,
    ttl: Duration,
    signals: RegistrationSignals,
) -> Result<(), DiscoveryError> {
    tokio::select! {
        biased;
        _ = signals.deregister.cancelled() => shared.remove(&cluster, &key, generation),
        _ = signals.stop.cancelled() => {
            tokio::select! {
                biased;
                _ = shared.root.cancelled() => {}
                _ = tokio::time::sleep(ttl) => shared.remove(&cluster, &key, generation),
            }
        }
    }
    Ok(())
}

impl Discovery for InMemoryDiscovery {
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
        let result = self.list_and_watch_impl(cluster);
        Box::pin(async move { result })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            {
                let mut state = self.shared.lock();
                state.closed = true;
                for c in state.clusters.values_mut() {
                    c.watchers.clear();
                }
            }
            self.shared.root.cancel();
            self.shared.tasks.close();
            self.shared.tasks.wait().await;
        })
    }
}

impl std::fmt::Debug for InMemoryDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryDiscovery").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::{test_descriptor as descriptor, Role, WorkerId};
    use std::sync::Arc;

    const TTL: Duration = Duration::from_secs(10);
    const MS: Duration = Duration::from_millis(1);

    fn cluster(name: &str) -> ClusterName {
        ClusterName::new(name).unwrap()
    }

    /// `d` as watchers see it: with the lease of `reg`, which holds it.
    fn held(d: WorkerDescriptor, reg: &Registration) -> WorkerDescriptor {
        match *reg.lease().borrow() {
            LeaseState::Held(lease) => WorkerDescriptor { lease: Some(lease), ..d },
            LeaseState::Lost => panic!("a registration in memory never loses its lease"),
        }
    }

    fn ids(list: &[WorkerDescriptor]) -> Vec<&str> {
        let mut ids: Vec<&str> = list.iter().map(|d| d.id.as_str()).collect();
        ids.sort();
        ids
    }

    #[tokio::test(start_paused = true)]
    async fn lists_registered_workers_and_watches_changes() {
        let d: Arc<dyn Discovery> = Arc::new(InMemoryDiscovery::new());
        let c = cluster("c");
        let _p = d.register(&c, descriptor("p0", Role::Prefill), TTL).await.unwrap();
        let _d = d.register(&c, descriptor("d0", Role::Decode), TTL).await.unwrap();
        let (snapshot, mut events) = d.list_and_watch(&c).await.unwrap();
        assert_eq!(ids(&snapshot), ["d0", "p0"]);
        assert_eq!(events.try_recv(), None, "the snapshot's workers are not repeated as events");

        let both = d.register(&c, descriptor("b0", Role::Both), TTL).await.unwrap();
        assert_eq!(events.recv().await, Some(DiscoveryEvent::Added(held(descriptor("b0", Role::Both), &both))));
        both.deregister().await.unwrap();
        assert_eq!(events.recv().await, Some(DiscoveryEvent::Removed(WorkerId::new("b0").unwrap())));
        assert_eq!(events.try_recv(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn deregister_is_immediate() {
        let d = InMemoryDiscovery::new();
        let c = cluster("c");
        let (_, mut events) = d.list_and_watch(&c).await.unwrap();
        let reg = d.register(&c, descriptor("p0", Role::Prefill), TTL).await.unwrap();
        assert!(matches!(events.recv().await, Some(DiscoveryEvent::Added(_))));
        let before = tokio::time::Instant::now();
        reg.deregister().await.unwrap();
        assert_eq!(tokio::time::Instant::now(), before, "no time passes on the paused clock");
        assert_eq!(events.try_recv(), Some(DiscoveryEvent::Removed(WorkerId::new("p0").unwrap())));
        assert!(d.list_and_watch(&c).await.unwrap().0.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_registration_expires_after_ttl() {
        let d = InMemoryDiscovery::new();
        let c = cluster("c");
        let reg = d.register(&c, descriptor("p0", Role::Prefill), TTL).await.unwrap();
        let (snapshot, mut events) = d.list_and_watch(&c).await.unwrap();
        assert_eq!(snapshot.len(), 1);
        let dropped_at = tokio::time::Instant::now();
        drop(reg);

        tokio::time::sleep(TTL - MS).await;
        assert_eq!(events.try_recv(), None, "still registered just before the TTL");
        assert_eq!(d.list_and_watch(&c).await.unwrap().0.len(), 1);

        assert_eq!(events.recv().await, Some(DiscoveryEvent::Removed(WorkerId::new("p0").unwrap())));
        assert_eq!(tokio::time::Instant::now() - dropped_at, TTL);
        assert!(d.list_and_watch(&c).await.unwrap().0.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn live_registration_never_expires() {
        let d = InMemoryDiscovery::new();
        let c = cluster("c");
        let reg = d.register(&c, descriptor("p0", Role::Prefill), TTL).await.unwrap();
        let (_, mut events) = d.list_and_watch(&c).await.unwrap();
        tokio::time::sleep(TTL * 100).await;
        assert_eq!(events.try_recv(), None);
        assert!(reg.is_active());
        assert_eq!(d.list_and_watch(&c).await.unwrap().0.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replaced_record_outlives_the_old_registration() {
        let d = InMemoryDiscovery::new();
        let c = cluster("c");
        let old = d.register(&c, descriptor("p0", Role::Prefill), TTL).await.unwrap();
        let (_, mut events) = d.list_and_watch(&c).await.unwrap();
        let mut newer = descriptor("p0", Role::Prefill);
        newer.grpc_addr = "127.0.0.1:6000".into();
        let new = d.register(&c, newer.clone(), TTL).await.unwrap();
        let newer = held(newer, &new);
        assert_ne!(newer.lease, held(descriptor("p0", Role::Prefill), &old).lease, "a new registration, a new lease");
        assert_eq!(events.recv().await, Some(DiscoveryEvent::Added(newer.clone())));

        // The old registration's expiry and deregistration leave the new record alone.
        drop(old);
        tokio::time::sleep(TTL * 2).await;
        assert_eq!(events.try_recv(), None);
        assert_eq!(d.list_and_watch(&c).await.unwrap().0, vec![newer]);

        new.deregister().await.unwrap();
        assert_eq!(events.recv().await, Some(DiscoveryEvent::Removed(WorkerId::new("p0").unwrap())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_back_in_another_role_is_not_removed_by_its_old_record() {
        let d = InMemoryDiscovery::new();
        let c = cluster("c");
        let old = d.register(&c, descriptor("w", Role::Prefill), TTL).await.unwrap();
        let (_, mut events) = d.list_and_watch(&c).await.unwrap();
        let new = d.register(&c, descriptor("w", Role::Decode), TTL).await.unwrap();
        let want = held(descriptor("w", Role::Decode), &new);
        assert_eq!(events.recv().await, Some(DiscoveryEvent::Added(want.clone())));
        old.deregister().await.unwrap();
        tokio::time::sleep(TTL * 2).await;
        assert_eq!(events.try_recv(), None);
        assert_eq!(d.list_and_watch(&c).await.unwrap().0, vec![want]);
    }

    #[tokio::test(start_paused = true)]
    async fn clusters_are_separate() {
        let d = InMemoryDiscovery::new();
        let (a, b) = (cluster("a"), cluster("b"));
        let (_, mut events_b) = d.list_and_watch(&b).await.unwrap();
        let _reg = d.register(&a, descriptor("p0", Role::Prefill), TTL).await.unwrap();
        assert_eq!(d.list_and_watch(&a).await.unwrap().0.len(), 1);
        assert!(d.list_and_watch(&b).await.unwrap().0.is_empty());
        assert_eq!(events_b.try_recv(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_watch_is_forgotten() {
        let d = InMemoryDiscovery::new();
        let c = cluster("c");
        let (_, events) = d.list_and_watch(&c).await.unwrap();
        drop(events);
        let _reg = d.register(&c, descriptor("p0", Role::Prefill), TTL).await.unwrap();
        assert!(d.shared.lock().clusters[&c].watchers.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_ttl_is_rejected() {
        let d = InMemoryDiscovery::new();
        let err = d.register(&cluster("c"), descriptor("p0", Role::Prefill), Duration::ZERO).await.unwrap_err();
        assert_eq!(err.kind(), "invalid_argument");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_tasks_and_ends_streams() {
        let d = InMemoryDiscovery::new();
        let c = cluster("c");
        let reg = d.register(&c, descriptor("p0", Role::Prefill), TTL).await.unwrap();
        let dropped = d.register(&c, descriptor("p1", Role::Prefill), TTL).await.unwrap();
        drop(dropped); // its task is waiting out the TTL: shutdown must not wait for it
        let (_, mut events) = d.list_and_watch(&c).await.unwrap();

        let before = tokio::time::Instant::now();
        d.shutdown().await;
        assert!(tokio::time::Instant::now() - before < TTL);
        assert_eq!(events.recv().await, None);
        assert!(!reg.is_active());
        assert_eq!(d.list_and_watch(&c).await.unwrap_err().kind(), "shutdown");
        let err = d.register(&c, descriptor("p2", Role::Prefill), TTL).await.unwrap_err();
        assert_eq!(err.kind(), "shutdown");
    }
}
