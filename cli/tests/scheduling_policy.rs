//! `WorkerConfig::scheduling_policy` (`--scheduling-policy`) through a real worker: the
//! engine actor with the real model, driven over gRPC as the router drives a worker of
//! role `both`, with the request's `priority` as the router forwards it.
//!
//! The worker runs one sequence at a time (`max_seqs` 1). A reservation waiting for KV
//! holds that one slot, so the local requests sent after it all wait, in a known arrival
//! order, until the reservation is cancelled; then they run one after another, and the
//! order of their first tokens is the order the policy admitted them in. No clock decides
//! anything.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem_cluster::Role;
use tandem_decode_worker::DecodeWorker;
use tandem_engine::scheduler::Policy;
use tandem_prefill_worker::PrefillWorker;
use tandem_proto::tandem::v1::FinishReason;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;
use tandem_worker_runtime::{RoleBuilders, RunningWorker, WorkerConfig};
use tokio::sync::mpsc;

/// A worker of any role: both role crates, as the `tandem` binary builds them.
const ROLES: RoleBuilders = RoleBuilders { prefill: Some(PrefillWorker::build), decode: Some(DecodeWorker::build) };

fn model() -> PathBuf {
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(m.exists(), "model missing: run scripts/fetch-model.sh first");
    m
}

/// Exactly `max_tokens` greedy tokens (EOS does not end the request early).
fn greedy(max_tokens: u32) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// A prompt of 20 tokens, different for each `k` (no prefix-cache hits between requests).
fn prompt(k: u32) -> Vec<u32> {
    (0..20).map(|i| 300 + 20 * k + i).collect()
}

/// The requests the test queues behind the reservation, in arrival order: (name, priority).
const QUEUED: [(&str, i32); 3] = [("low-1", 5), ("low-2", 5), ("high", -5)];

/// Starts a worker of role `both` running `policy`, queues `QUEUED` behind a reservation that
/// holds its only sequence slot, releases the slot, and returns the names in the order their
/// first tokens arrived.
async fn first_token_order(policy: Policy) -> Vec<&'static str> {
    let cfg = WorkerConfig {
        shm: false,
        kv_blocks: Some(64),
        max_seqs: 1,
        scheduling_policy: policy,
        ..WorkerConfig::new("both-sched", Role::Both, model())
    };
    let w = RunningWorker::start(cfg, None, ROLES).await.unwrap();
    let mut c = WorkerClient::connect(format!("http://{}", w.grpc_addr)).await.unwrap();

    // The blocker: reserved blocks whose KV never comes, counted as the one running sequence.
    let blocker = 1;
    c.reserve(pb::ReserveRequest {
        request_id: blocker,
        prompt_token_ids: prompt(0),
        lease_ms: 60_000,
        max_tokens: 4,
        sampling: Some(greedy(4)),
        ..Default::default()
    })
    .await
    .unwrap();

    // `Decode` answers once the engine has queued the request, so they arrive in this order.
    let (order_tx, mut order) = mpsc::unbounded_channel();
    let mut readers = Vec::new();
    for (i, (name, priority)) in QUEUED.into_iter().enumerate() {
        let mut stream = c
            .decode(pb::DecodeRequest {
                request_id: 10 + i as u64,
                sampling: Some(greedy(4)),
                prompt_token_ids: prompt(1 + i as u32),
                priority,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let order_tx = order_tx.clone();
        readers.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            let mut finish = 0;
            while let Some(m) = stream.message().await.unwrap() {
                if tokens.is_empty() && !m.token_ids.is_empty() {
                    order_tx.send(name).unwrap();
                }
                tokens.extend(m.token_ids);
                finish = m.finish_reason;
            }
            (tokens.len(), finish)
        }));
    }
    // The load report trails the engine by a step: look until it shows all three queued.
    let end = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let s = c.stats(pb::StatsRequest {}).await.unwrap().into_inner();
        if s.waiting == 3 || Instant::now() > end {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        (stats.waiting_for_kv, stats.running, stats.waiting),
        (1, 0, 3),
        "the reservation holds the only slot; every request waits"
    );

    // Releasing the slot: the queued requests run one at a time, in the policy's order.
    let cancelled = c.cancel(pb::CancelRequest { request_id: blocker, reason: "test".into() }).await.unwrap();
    assert!(cancelled.into_inner().found);
    for r in readers {
        let (n, finish) = r.await.unwrap();
        assert_eq!((n, finish), (4, FinishReason::Length as i32), "every queued request runs to its end");
    }
    drop(order_tx);
    let mut got = Vec::new();
    while let Some(name) = order.recv().await {
        got.push(name);
    }
    assert!(w.drain(Duration::from_secs(5)).await);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcfs_runs_waiting_requests_in_arrival_order_whatever_their_priority() {
    assert_eq!(first_token_order(Policy::Fcfs).await, ["low-1", "low-2", "high"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_policy_runs_a_later_high_priority_request_before_earlier_low_priority_ones() {
    assert_eq!(
        first_token_order(Policy::Priority).await,
        ["high", "low-1", "low-2"],
        "lower `priority` first, then arrival"
    );
}
