//! What the worker-level tests share.

use std::time::{Duration, Instant};

use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;
use tonic::transport::Channel;

/// The worker's stats once it holds nothing (nothing running or waiting, no KV block
/// used), or as they are after 10 s: the caller asserts on what it gets.
pub async fn wait_idle(c: &mut WorkerClient<Channel>) -> pb::StatsResponse {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.stats(pb::StatsRequest {}).await.unwrap().into_inner();
        if (s.running, s.waiting, s.waiting_for_kv, s.kv_blocks_used) == (0, 0, 0, 0) || Instant::now() > end {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
