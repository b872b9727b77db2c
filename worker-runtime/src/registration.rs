//! A worker's place in discovery: registered (retrying while discovery is
//! unreachable), and fenced while its registration has lost its lease.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tandem_cluster::{ClusterName, Discovery, LeaseState, Registration, WorkerDescriptor};
use tandem_kvtransfer::KvSender;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::state::WorkerState;

/// Registers (retrying while discovery is unreachable) and holds the registration.
pub(crate) struct RegistrationTask {
    pub stop: CancellationToken,
    pub task: JoinHandle<Option<Registration>>,
    /// Turns true once the worker is registered.
    pub registered: tokio::sync::watch::Receiver<bool>,
}

/// Where and as what a worker registers.
#[derive(Clone)]
pub(crate) struct Registering {
    pub discovery: Arc<dyn Discovery>,
    pub cluster: ClusterName,
    pub descriptor: WorkerDescriptor,
    pub ttl: Duration,
}

/// Keeps trying to register until it works (etcd may be down at start), then holds the
/// registration until stopped. A prefill-capable worker's `sender` announces the lease it
/// holds.
pub(crate) fn register_forever(
    r: Registering,
    state: Arc<WorkerState>,
    sender: Option<Arc<KvSender>>,
) -> RegistrationTask {
    let Registering { discovery: d, cluster, descriptor, ttl } = r;
    let stop = CancellationToken::new();
    let s = stop.clone();
    let (done, registered) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let mut wait = Duration::from_millis(100);
        loop {
            let attempt = tokio::select! {
                r = d.register(&cluster, descriptor.clone(), ttl) => r,
                _ = s.cancelled() => return None,
            };
            match attempt {
                Ok(reg) => {
                    let _ = done.send(true);
                    follow_lease(&reg, &state, sender.as_deref(), &s).await;
                    return Some(reg);
                }
                Err(e) => {
                    let worker = &descriptor.id;
                    tracing::warn!(worker = %worker, error = %e, retry_in = ?wait, "registration failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = s.cancelled() => return None,
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    RegistrationTask { stop, task, registered }
}

/// Fences the worker while its registration has lost its lease (the store dropped its
/// record, so routers dropped it and another incarnation may take its id): new work is
/// refused until it holds a new lease. Returns when `stop` is cancelled.
async fn follow_lease(reg: &Registration, state: &WorkerState, sender: Option<&KvSender>, stop: &CancellationToken) {
    let mut lease = reg.lease();
    let mut last = None;
    loop {
        let now = *lease.borrow_and_update();
        state.fenced.store(now == LeaseState::Lost, Ordering::SeqCst);
        if last.is_some() && last != Some(now) {
            match now {
                LeaseState::Lost => tracing::warn!(worker = %state.id, "lost its discovery lease; fenced"),
                LeaseState::Held(id) => {
                    tracing::info!(worker = %state.id, lease = id.get(), "registered again; serving")
                }
            }
        }
        last = Some(now);
        if let (LeaseState::Held(id), Some(tx)) = (now, sender) {
            tx.set_lease(Some(id)).await;
        }
        tokio::select! {
            r = lease.changed() => {
                if r.is_err() {
                    // The registration's task ended: nothing changes any more.
                    return stop.cancelled().await;
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}
