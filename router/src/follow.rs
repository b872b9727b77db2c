//! Following one worker's `KvEvents` stream into the router's prefix index.
//!
//! A stream opens with a snapshot of what the worker caches, then carries every change
//! with consecutive ids. Whenever the stream cannot be trusted (it broke, it ended, an id
//! is missing or out of order, the worker fell behind and said so) the worker's entries
//! are dropped at once and a new stream is opened, which starts from a fresh snapshot. A
//! worker that restarted (its stream broke) is therefore never routed to as if it still
//! held its old blocks, and a router that restarted knows every worker's cache within one
//! snapshot.

use std::sync::Weak;
use std::time::Duration;

use tandem_cluster::WorkerId;
use tandem_proto::auth::WorkerChannel;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;

use crate::members::Members;
use crate::metrics;

/// Longest wait for a worker to open its stream (it answers between engine steps).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// The first wait before subscribing again; doubled per failure in a row, up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Follows worker `id`'s KV events for as long as `members` lives (the task is aborted when
/// the worker leaves the view). An open stream may idle for as long as the worker caches
/// nothing new: there is no deadline on its next message, but the channel's HTTP/2
/// keep-alive ends it when the worker is gone, and the load poller stops routing there.
pub(crate) async fn follow_kv_events(members: Weak<Members>, id: WorkerId, mut client: WorkerClient<WorkerChannel>) {
    let mut delay = RETRY_MIN;
    loop {
        let why = match tokio::time::timeout(OPEN_TIMEOUT, client.kv_events(pb::KvEventsRequest {})).await {
            Ok(Ok(resp)) => {
                let Some(m) = members.upgrade() else { return };
                m.index.lock().expect("index").restart(&id);
                drop(m);
                follow(&members, &id, resp.into_inner(), &mut delay).await
            }
            Ok(Err(status)) => format!("subscribing failed: {}", status.message()),
            Err(_) => format!("subscribing took over {OPEN_TIMEOUT:?}"),
        };
        let Some(m) = members.upgrade() else { return };
        // What the worker holds is unknown until the next snapshot: not a hit anywhere.
        m.index.lock().expect("index").restart(&id);
        metrics::index_blocks(&id, 0);
        drop(m);
        tracing::debug!(worker = %id, reason = %why, retry_in = ?delay, "KV event stream restarts from a snapshot");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Applies one stream's events until it must start over; returns why. `delay` is reset
/// once the stream has proved itself (its snapshot read whole).
async fn follow(
    members: &Weak<Members>,
    id: &WorkerId,
    mut stream: tonic::Streaming<pb::KvEventBatch>,
    delay: &mut Duration,
) -> String {
    let mut synced = false;
    loop {
        let batch = match stream.message().await {
            Ok(Some(b)) => b,
            Ok(None) => return "the worker ended the stream".into(),
            Err(s) if s.code() == tonic::Code::DataLoss => {
                metrics::index_resync(id, "lagged");
                return format!("the worker fell behind: {}", s.message());
            }
            Err(s) => return format!("the stream broke: {}", s.message()),
        };
        let Some(m) = members.upgrade() else { return "the router is stopping".into() };
        let mut index = m.index.lock().expect("index");
        for ev in &batch.events {
            if let Err(r) = index.apply(id, ev) {
                metrics::index_resync(id, r.as_str());
                tracing::warn!(worker = %id, problem = ?r, "KV events out of sequence; resubscribing from a snapshot");
                return format!("events out of sequence: {r:?}");
            }
        }
        if !synced && index.synced(id) {
            synced = true;
            *delay = RETRY_MIN;
            tracing::debug!(worker = %id, blocks = index.blocks(id), "prefix index has the worker's snapshot");
        }
        metrics::index_blocks(id, index.blocks(id));
    }
}
