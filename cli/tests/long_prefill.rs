//! Head-of-line blocking on a prefill worker: one prompt near the model's context
//! (SmolLM2-135M, 8,192 tokens; the test's long prompt has `LONG` = 3,000, what one
//! compute thread prefills well within the 60 s lease on 2 busy cores) must not hold
//! the first token of short prompts that arrive behind it.
//!
//! A prefill worker and a decode worker in one process, driven through their gRPC
//! services as the router drives them (Reserve, Decode, Prefill), KV over real TCP.
//! The short prompts' time to first token is measured unloaded, then again while the
//! long prompt is being computed; the loaded one must stay within `SLOWDOWN` × unloaded
//! plus `STEPS` × the unloaded time to first token of a prompt that fills one whole step
//! (the step of the long prompt in flight when a short one arrives, then the short
//! one's own, both dearer deep into the long prompt; measured rather than fixed, so a
//! busy machine does not fail the test), and every transfer, the long one's included,
//! must succeed. With `--long-prefill-share 100` (plain first come, first served) the
//! first short prompt waits for the whole long prefill instead (measured: 28 s against
//! a bound of 8 s).
//!
//! And a prefill whose destination's lease ends stops at once and frees its blocks,
//! where it used to compute the whole prompt for nobody.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem_cluster::Role;
use tandem_decode_worker::DecodeWorker;
use tandem_prefill_worker::PrefillWorker;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;
use tandem_worker_runtime::{RoleBuilders, RunningWorker, WorkerConfig};
use tonic::transport::Channel;

mod common;
use common::wait_idle;

/// Tokens in the long prompt (the model's context is 8,192).
const LONG: usize = 3000;
/// Short prompts, each one partial block (so no prefix-cache hit between the two rounds).
const SHORTS: [&[u32]; 3] = [&[1, 504, 3101], &[1, 1216, 2004, 331], &[1, 4123, 77]];
/// Loose bound on the loaded time to first token: this many times the unloaded one ...
const SLOWDOWN: u32 = 10;
/// ... plus this many full steps (`--max-batched-tokens`, 512 by default).
const STEPS: u32 = 4;

/// A worker of any role: both role crates, as the `tandem` binary builds them.
const ROLES: RoleBuilders = RoleBuilders { prefill: Some(PrefillWorker::build), decode: Some(DecodeWorker::build) };

fn model() -> PathBuf {
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(m.exists(), "model missing: run scripts/fetch-model.sh first");
    m
}

/// The long prompt: `LONG` tokens.
fn long_prompt() -> Vec<u32> {
    (0..LONG as u32).map(|i| 300 + (i * 37) % 20_000).collect()
}

fn greedy(max_tokens: u32) -> pb::SamplingParams {
    pb::SamplingParams { temperature: 0.0, top_p: 1.0, repetition_penalty: 1.0, max_tokens, ..Default::default() }
}

/// The first token's time and the stream's tokens.
struct Done {
    ttft: Duration,
    tokens: Vec<u32>,
}

/// A worker of `role` whose long prefills keep `share` percent of a step.
async fn start(id: &str, role: Role, share: usize) -> (RunningWorker, WorkerClient<Channel>) {
    let cfg = WorkerConfig { shm: false, long_prefill_share: share, ..WorkerConfig::new(id, role, model()) };
    let w = RunningWorker::start(cfg, None, ROLES).await.unwrap();
    let c = WorkerClient::connect(format!("http://{}", w.grpc_addr)).await.unwrap();
    (w, c)
}

fn reserve_request(rid: u64, ids: &[u32], lease_ms: u32, max_tokens: u32) -> pb::ReserveRequest {
    pb::ReserveRequest {
        request_id: rid,
        prompt_token_ids: ids.to_vec(),
        lease_ms,
        max_tokens,
        sampling: Some(greedy(max_tokens)),
        ..Default::default()
    }
}

/// `Prefill` into the reservation `res` on decode worker `to`.
fn prefill_request(rid: u64, ids: Vec<u32>, max_tokens: u32, to: &str, res: pb::ReserveResponse) -> pb::PrefillRequest {
    pb::PrefillRequest {
        request_id: rid,
        prompt_token_ids: ids,
        sampling: Some(greedy(max_tokens)),
        destination: Some(pb::KvDestination {
            worker_id: to.into(),
            endpoints: res.kv_endpoints,
            block_ids: res.block_ids,
            cached_blocks: res.cached_blocks,
            layout: res.layout,
            lease_ms: res.lease_ms,
        }),
        ..Default::default()
    }
}

/// The router's three calls for one request, timed from `Reserve` to the first streamed token.
async fn request(
    mut dc: WorkerClient<Channel>,
    mut pc: WorkerClient<Channel>,
    rid: u64,
    ids: Vec<u32>,
    max_tokens: u32,
) -> Result<Done, String> {
    let start = Instant::now();
    let res = dc
        .reserve(reserve_request(rid, &ids, 60_000, max_tokens))
        .await
        .map_err(|e| format!("reserve {rid}: {e}"))?
        .into_inner();
    let mut stream = dc
        .decode(pb::DecodeRequest { request_id: rid, sampling: Some(greedy(max_tokens)), ..Default::default() })
        .await
        .map_err(|e| format!("decode {rid}: {e}"))?
        .into_inner();
    let reader = tokio::spawn(async move {
        let mut first = None;
        let mut tokens = Vec::new();
        let mut finish = 0;
        while let Some(m) = stream.message().await.map_err(|e| format!("stream {rid}: {e}"))? {
            if first.is_none() && !m.token_ids.is_empty() {
                first = Some(start.elapsed());
            }
            tokens.extend(m.token_ids);
            finish = m.finish_reason;
        }
        match (first, finish) {
            (Some(ttft), f) if f != 0 => Ok(Done { ttft, tokens }),
            _ => Err(format!("stream {rid} ended without a finished generation")),
        }
    });
    pc.prefill(prefill_request(rid, ids, max_tokens, "decode-long", res))
        .await
        .map_err(|e| format!("prefill {rid}: {e}"))?;
    reader.await.map_err(|e| e.to_string())?
}

/// Unloaded and loaded times to first token of `SHORTS` on a prefill worker whose long
/// prefills keep `share` percent of a step, and the long request's own.
/// Also the unloaded time to first token of a prompt of one full step.
async fn measure(share: usize) -> (Vec<Done>, Vec<Done>, Done, Duration) {
    let (p, pc) = start("prefill-long", Role::Prefill, share).await;
    let (d, dc) = start("decode-long", Role::Decode, share).await;

    let mut unloaded = Vec::new();
    for (i, ids) in SHORTS.iter().enumerate() {
        unloaded.push(request(dc.clone(), pc.clone(), 10 + i as u64, ids.to_vec(), 2).await.unwrap());
    }
    let budget = WorkerConfig::new("", Role::Prefill, "").max_batched_tokens as u32;
    let step_ids: Vec<u32> = (0..budget).map(|i| 20_500 + (i * 13) % 20_000).collect();
    let step = request(dc.clone(), pc.clone(), 2, step_ids, 1).await.unwrap().ttft;

    let long_ids = long_prompt();
    let long = tokio::spawn(request(dc.clone(), pc.clone(), 1, long_ids, 2));
    // Until the prefill worker is computing the long prompt (a chunk done, most to go).
    let mut stats = pc.clone();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let s = stats.stats(pb::StatsRequest {}).await.unwrap().into_inner();
        if s.running == 1 && s.queued_prefill_tokens > 0 && s.queued_prefill_tokens < LONG as u64 {
            break;
        }
        assert!(Instant::now() < end, "the long prompt never started: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut loaded = Vec::new();
    for (i, ids) in SHORTS.iter().enumerate() {
        loaded.push(request(dc.clone(), pc.clone(), 20 + i as u64, ids.to_vec(), 2).await.unwrap());
    }
    let long = long.await.unwrap().unwrap();
    assert!(p.drain(Duration::from_secs(5)).await);
    assert!(d.drain(Duration::from_secs(5)).await);
    (unloaded, loaded, long, step)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_prompts_behind_a_max_context_prompt_get_their_first_token_promptly() {
    let share = tandem_engine::scheduler::SchedulerConfig::default().long_prefill_share;
    let (unloaded, loaded, long, step) = measure(share).await;
    let base = unloaded.iter().map(|d| d.ttft).max().unwrap();
    let bound = base * SLOWDOWN + step * STEPS;
    let ms = |d: &Duration| d.as_millis();
    eprintln!(
        "share {share}%: unloaded TTFT {:?} ms, one full step {} ms; behind a {LONG}-token prompt {:?} ms \
         (bound {} ms); the long prompt's TTFT {} ms",
        unloaded.iter().map(|d| ms(&d.ttft)).collect::<Vec<_>>(),
        ms(&step),
        loaded.iter().map(|d| ms(&d.ttft)).collect::<Vec<_>>(),
        ms(&bound),
        ms(&long.ttft),
    );
    for (i, (u, l)) in unloaded.iter().zip(&loaded).enumerate() {
        assert_eq!(u.tokens, l.tokens, "short prompt {i}: the same greedy tokens loaded and unloaded");
        assert!(l.ttft <= bound, "short prompt {i} waited {:?} for its first token (bound {bound:?})", l.ttft);
    }
    assert_eq!(long.tokens.len(), 2, "the long prompt's transfer succeeded and it decoded");
}

/// A prefill far longer than its destination's lease keeps the reservation by renewing it;
/// when the reservation ends on the decode side anyway (cancelled there, as a router does
/// when its client goes), the next renewal is refused and the prefill stops at once, its
/// blocks freed, long before the prompt's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_whose_destination_reservation_ends_stops_at_once_and_frees_its_blocks() {
    let share = tandem_engine::scheduler::SchedulerConfig::default().long_prefill_share;
    let (p, mut pc) = start("prefill-lease", Role::Prefill, share).await;
    let (d, mut dc) = start("decode-lease", Role::Decode, share).await;
    // How far the prefill got: the prompt blocks its steps put into the prefix cache.
    let mut events = pc.kv_events(pb::KvEventsRequest {}).await.unwrap().into_inner();
    // A lease far shorter than the prompt's prefill (tens of seconds on 2 cores): renewed.
    let ids = long_prompt();
    let res = dc.reserve(reserve_request(5, &ids, 1_500, 2)).await.unwrap().into_inner();
    let mut stream = dc
        .decode(pb::DecodeRequest { request_id: 5, sampling: Some(greedy(2)), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let prefill = tokio::spawn({
        let mut pc = pc.clone();
        async move { pc.prefill(prefill_request(5, ids, 2, "decode-lease", res)).await }
    });
    // Past two leases, the prefill is still at work and the reservation still held.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert!(!prefill.is_finished(), "the prefill ended within two leases: {:?}", prefill.await);
    let held = dc.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(held.waiting_for_kv, 1, "the reservation outlived its first lease: {held:?}");
    let cancel = pb::CancelRequest { request_id: 5, reason: "the client went away".into() };
    assert!(dc.cancel(cancel).await.unwrap().into_inner().found);
    let err = tokio::time::timeout(Duration::from_secs(10), prefill)
        .await
        .expect("the prefill stops within a renewal period")
        .unwrap()
        .expect_err("the reservation ended long before the prompt is computed");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    // The prefill worker stopped computing and freed the prompt's blocks ...
    let s = wait_idle(&mut pc).await;
    assert_eq!((s.running, s.waiting, s.queued_prefill_tokens, s.kv_blocks_used), (0, 0, 0, 0), "{s:?}");
    // ... long before the end of the prompt (before the fix it computed all of it).
    let mut stored = 0;
    while let Ok(Some(Ok(batch))) =
        tokio::time::timeout(Duration::from_millis(500), events.message()).await.map(|m| m.transpose())
    {
        for e in batch.events {
            if let Some(pb::kv_event::Event::Stored(s)) = e.event {
                stored += s.block_hashes.len();
            }
        }
    }
    eprintln!("abandoned after {stored} of {} prompt blocks: {}", LONG / 16, err.message());
    assert!(stored < LONG / 16, "the prefill went on to the prompt's end ({stored} blocks stored)");
    // The decode side ended the request and freed its reservation.
    assert!(stream.message().await.is_err(), "the decode stream reports the cancel");
    let s = wait_idle(&mut dc).await;
    assert_eq!((s.waiting_for_kv, s.kv_blocks_used), (0, 0), "{s:?}");
    assert!(p.drain(Duration::from_secs(5)).await);
    assert!(d.drain(Duration::from_secs(5)).await);
}
