//! The cluster's decode workers as this (prefill-capable) worker's own discovery watch
//! lists them: a `Prefill` sends KV only to one of them, at the endpoints it registered,
//! never to an address a caller names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_kvtransfer::{KvTarget, LocalTarget};
use tandem_proto::tandem::worker::v1 as pb;
use tonic::Status;

/// This worker's view of the cluster's members, kept by a discovery watch
/// (`follow_peers`); its version ticks with every change.
#[derive(Clone)]
pub struct Peers {
    view: Arc<std::sync::RwLock<tandem_cluster::ClusterView>>,
    version: tokio::sync::watch::Sender<u64>,
}

impl Default for Peers {
    fn default() -> Self {
        Peers { view: Arc::default(), version: tokio::sync::watch::channel(0).0 }
    }
}

impl Peers {
    /// Applies a discovery event.
    pub fn apply(&self, event: tandem_cluster::DiscoveryEvent) {
        self.view.write().expect("peers").apply(event);
        self.version.send_modify(|v| *v += 1);
    }

    /// Replaces the view with a fresh listing.
    pub fn reset(&self, snapshot: Vec<tandem_cluster::WorkerDescriptor>) {
        *self.view.write().expect("peers") = tandem_cluster::ClusterView::from_snapshot(snapshot);
        self.version.send_modify(|v| *v += 1);
    }

    /// The registered descriptor of decode-capable worker `id`, waiting up to `within` for
    /// the view to learn of it.
    pub(crate) async fn decode_worker(&self, id: &str, within: Duration) -> Option<tandem_cluster::WorkerDescriptor> {
        let id = tandem_cluster::WorkerId::new(id).ok()?;
        let mut changes = self.version.subscribe();
        let end = tokio::time::Instant::now() + within;
        loop {
            let found = self.view.read().expect("peers").get(&id).filter(|d| d.role.can_decode()).cloned();
            if found.is_some() {
                return found;
            }
            match tokio::time::timeout_at(end, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }
}

/// Keeps `peers` in step with discovery's listing of `cluster` until cancelled.
pub async fn follow_peers(
    discovery: Arc<dyn tandem_cluster::Discovery>,
    cluster: tandem_cluster::ClusterName,
    peers: Peers,
) {
    let p = peers.clone();
    tandem_cluster::follow_members(discovery, cluster, move |listed| p.reset(listed), |ev| peers.apply(ev)).await
}

/// The KV endpoints a `Prefill` names, parsed (checked against `Peers` before use).
pub(crate) fn kv_target(e: &pb::KvEndpoints) -> Result<KvTarget, Status> {
    let tcp: SocketAddr = e
        .tcp_address
        .parse()
        .map_err(|_| Status::invalid_argument(format!("destination tcp_address {:?} is not ip:port", e.tcp_address)))?;
    let local = e
        .shm
        .as_ref()
        .filter(|s| !s.socket_path.is_empty())
        .map(|s| LocalTarget { uds: s.socket_path.clone().into(), host: s.host_id.clone() });
    Ok(KvTarget { tcp, local })
}
