//! The cluster's decode workers as this worker's own discovery watch lists them: KV
//! leaves a worker (a `Prefill`'s, or a live migration's) only for one of them, at the
//! endpoints it registered, never for an address a caller names (`check_destination`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_engine::kv_cache::BlockId;
use tandem_kvtransfer::{KvTarget, LocalTarget};
use tandem_proto::tandem::worker::v1 as pb;
use tonic::Status;

use crate::convert::layout_from_pb;
use crate::state::WorkerState;

/// How long a call naming a destination this worker's view of discovery does not hold yet
/// waits for the view to catch up (the router may have seen it join first).
pub const PEER_WAIT: Duration = Duration::from_secs(2);

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
    pub async fn decode_worker(&self, id: &str, within: Duration) -> Option<tandem_cluster::WorkerDescriptor> {
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

/// The KV endpoints a call names, parsed (checked against `Peers` before use).
fn kv_target(e: &pb::KvEndpoints) -> Result<KvTarget, Status> {
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

/// A destination for KV, checked (`check_destination`).
pub struct Destination {
    pub worker_id: String,
    pub target: KvTarget,
    /// The reserved blocks, in token order.
    pub block_ids: Vec<BlockId>,
    /// Leading blocks the destination holds already: not sent.
    pub skip: usize,
    /// The destination's reservation lease (a transfer ends with it).
    pub lease: Duration,
}

/// Checks where a call wants KV sent: the destination's layout against this worker's, that
/// it is a decode worker of this cluster at the endpoints it registered (with `peers`; a
/// worker without discovery checks no membership), and that it reserved `need` blocks of
/// which it holds fewer than all.
pub async fn check_destination(
    s: &WorkerState,
    peers: Option<&Peers>,
    dest: pb::KvDestination,
    need: usize,
) -> Result<Destination, Status> {
    let layout = layout_from_pb(&dest.layout.unwrap_or_default()).map_err(Status::invalid_argument)?;
    if let Some(m) = s.layout.mismatch(&layout) {
        return Err(Status::failed_precondition(format!("destination KV layout differs: {m}")));
    }
    let target = kv_target(&dest.endpoints.unwrap_or_default())?;
    if let Some(peers) = peers {
        // KV goes only to the cluster's decode workers, at the endpoints they registered:
        // never to an address a caller names.
        let Some(d) = peers.decode_worker(&dest.worker_id, PEER_WAIT).await else {
            return Err(Status::failed_precondition(format!(
                "destination {:?} is not a decode worker of this cluster",
                dest.worker_id
            )));
        };
        let registered_local = d.kv.local.as_ref().map(|l| (l.uds.as_path(), l.host_id.as_str()));
        let named_local = target.local.as_ref().map(|l| (l.uds.as_path(), l.host.as_str()));
        if target.tcp != d.kv.tcp || named_local.is_some_and(|n| Some(n) != registered_local) {
            return Err(Status::failed_precondition(format!(
                "destination endpoints are not the ones {:?} registered",
                dest.worker_id
            )));
        }
    }
    if dest.block_ids.len() != need {
        return Err(Status::invalid_argument(format!(
            "destination has {} blocks for KV that needs {need}",
            dest.block_ids.len()
        )));
    }
    // The destination's cache never holds the block of the last token.
    let skip = dest.cached_blocks as usize;
    if skip >= need {
        return Err(Status::invalid_argument(format!(
            "destination holds {skip} of the {need} blocks already; at most {} can be",
            need.saturating_sub(1)
        )));
    }
    // The transfer ends with the destination's reservation: nothing waits for it after.
    let lease = match dest.lease_ms {
        0 => s.max_lease,
        ms => Duration::from_millis(ms as u64).min(s.max_lease),
    };
    let block_ids = dest.block_ids.into_iter().map(BlockId).collect();
    Ok(Destination { worker_id: dest.worker_id, target, block_ids, skip, lease })
}
