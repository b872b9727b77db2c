//! A prefill worker and a decode worker in one process, driven through their gRPC
//! service exactly as the router drives them (Reserve, Decode, Prefill), with
//! shared memory switched off so the KV crosses a real TCP connection; and, with it
//! on, a stranger's Prefill aimed at another request's cached blocks (issue 15, item 2).

use std::path::PathBuf;
use std::time::Duration;

use tandem_cluster::Role;
use tandem_decode_worker::DecodeWorker;
use tandem_engine::sampling::SamplingParams;
use tandem_engine::{Engine, EngineConfig};
use tandem_prefill_worker::PrefillWorker;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;
use tandem_text::Prompt;
use tandem_worker_runtime::{RoleBuilders, RunningWorker, WorkerConfig};
use tonic::transport::Channel;

mod common;
use common::wait_idle;

/// A worker of any role: both role crates, as the `tandem` binary builds them.
const ROLES: RoleBuilders = RoleBuilders { prefill: Some(PrefillWorker::build), decode: Some(DecodeWorker::build) };

fn model() -> PathBuf {
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(m.exists(), "model missing: run scripts/fetch-model.sh first");
    m
}

async fn start(id: &str, role: Role) -> (RunningWorker, WorkerClient<Channel>) {
    start_with(id, role, false).await
}

async fn start_with(id: &str, role: Role, shm: bool) -> (RunningWorker, WorkerClient<Channel>) {
    let cfg = WorkerConfig { shm, kv_blocks: Some(256), ..WorkerConfig::new(id, role, model()) };
    let w = RunningWorker::start(cfg, None, ROLES).await.unwrap();
    let c = WorkerClient::connect(format!("http://{}", w.grpc_addr)).await.unwrap();
    (w, c)
}

fn greedy(max_tokens: u32) -> pb::SamplingParams {
    pb::SamplingParams { temperature: 0.0, top_p: 1.0, repetition_penalty: 1.0, max_tokens, ..Default::default() }
}

async fn used_blocks(c: &mut WorkerClient<Channel>) -> u32 {
    c.stats(pb::StatsRequest {}).await.unwrap().into_inner().kv_blocks_used
}

/// What a disaggregated request's stream came to.
struct Streamed {
    first_token: u32,
    tokens: Vec<u32>,
    text: String,
    finish: i32,
}

/// The router's three calls for one request (reserve on `dc`, attach its stream, prefill on
/// `pc` into the reservation) and the stream read to its end.
async fn disaggregated(
    dc: &mut WorkerClient<Channel>,
    pc: &mut WorkerClient<Channel>,
    rid: u64,
    ids: &[u32],
    max_tokens: u32,
) -> (pb::ReserveResponse, Streamed) {
    let res = dc
        .reserve(pb::ReserveRequest {
            request_id: rid,
            prompt_token_ids: ids.to_vec(),
            lease_ms: 10_000,
            max_tokens,
            sampling: Some(greedy(max_tokens)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut stream = dc
        .decode(pb::DecodeRequest { request_id: rid, sampling: Some(greedy(max_tokens)), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let pre = pc
        .prefill(pb::PrefillRequest {
            request_id: rid,
            prompt_token_ids: ids.to_vec(),
            sampling: Some(greedy(max_tokens)),
            destination: Some(pb::KvDestination {
                worker_id: "decode-t".into(),
                endpoints: res.kv_endpoints.clone(),
                block_ids: res.block_ids.clone(),
                cached_blocks: res.cached_blocks,
                layout: res.layout,
                lease_ms: res.lease_ms,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Streamed { first_token: pre.first_token_id, tokens: Vec::new(), text: String::new(), finish: 0 };
    while let Some(m) = stream.message().await.unwrap() {
        got.text.push_str(&m.text);
        got.tokens.extend(m.token_ids);
        got.finish = m.finish_reason;
    }
    (res, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_and_decode_workers_over_tcp_generate_what_one_engine_does() {
    let (p, mut pc) = start("prefill-t", Role::Prefill).await;
    let (d, mut dc) = start("decode-t", Role::Decode).await;
    assert!(d.descriptor.kv.local.is_none(), "shared memory is off: KV goes over TCP");

    let mut engine =
        Engine::load(&EngineConfig { model_path: model(), threads: 1, ..EngineConfig::default() }).unwrap();
    let prompt = Prompt::Chat(vec![tandem_text::chat::ChatMessage::new("user", "Write a haiku about the sea.")]);
    let ids = engine.prompt_ids(&prompt).unwrap();
    let params = SamplingParams { temperature: 0.0, max_tokens: 40, ..SamplingParams::default() };
    let want = engine.generate(ids.clone(), &params, 1, |_| {}).unwrap().choices.remove(0);

    let mut events = dc.kv_events(pb::KvEventsRequest {}).await.unwrap().into_inner();
    let first = events.message().await.unwrap().unwrap();
    assert!(
        matches!(&first.events[0].event, Some(pb::kv_event::Event::Snapshot(s)) if s.last && s.block_hashes.is_empty()),
        "a fresh worker's stream opens with an empty snapshot: {first:?}"
    );
    assert_eq!(first.events[0].event_id, 1);

    // Reserve, attach, prefill: the router's three calls.
    let (res, got) = disaggregated(&mut dc, &mut pc, 42, &ids, 40).await;
    assert_eq!(res.block_ids.len(), ids.len().div_ceil(16));
    assert_eq!(res.cached_blocks, 0, "nothing cached yet");
    assert_eq!(got.first_token, want.token_ids[0], "the prefill worker's first token");
    assert_eq!(got.tokens, want.token_ids, "decoded from KV received over TCP");
    assert_eq!(got.text, want.text);
    assert_ne!(got.finish, 0);

    // The decode worker registered the prompt's blocks in its prefix cache and said so.
    let batch = tokio::time::timeout(Duration::from_secs(5), events.message()).await.unwrap().unwrap().unwrap();
    let stored: usize = batch
        .events
        .iter()
        .map(|e| match &e.event {
            Some(pb::kv_event::Event::Stored(s)) => s.block_hashes.len(),
            _ => 0,
        })
        .sum();
    assert!(stored >= ids.len() / 16, "KV events report the stored prompt blocks ({stored})");
    assert_eq!(batch.events[0].event_id, 2, "live events follow the snapshot's id");

    // A new subscriber (a router started now) learns the same blocks from its snapshot, named
    // as the router names a prompt's blocks.
    let mut late = dc.kv_events(pb::KvEventsRequest {}).await.unwrap().into_inner();
    let snap = late.message().await.unwrap().unwrap();
    let Some(pb::kv_event::Event::Snapshot(snapshot)) = &snap.events[0].event else {
        panic!("a stream opens with a snapshot: {snap:?}")
    };
    assert!(snapshot.last && snap.events[0].event_id == 1);
    let expected = tandem_text::prefix::prefix_hashes(&ids, 16, None);
    assert!(
        expected.iter().all(|h| snapshot.block_hashes.contains(&h.0)),
        "the snapshot holds every full block of the prompt: {} of {:?}",
        snapshot.block_hashes.len(),
        expected.len()
    );

    // The same prompt again: the decode worker holds its full blocks but the last, so only
    // that one travels, and the text is the same.
    assert_eq!(wait_idle(&mut dc).await.kv_blocks_used, 0);
    let (res, again) = disaggregated(&mut dc, &mut pc, 43, &ids, 40).await;
    assert_eq!(res.cached_blocks as usize, (ids.len() - 1) / 16, "every full block before the last token");
    assert_eq!(res.block_ids.len(), ids.len().div_ceil(16));
    assert_eq!((again.tokens, again.text), (want.token_ids.clone(), want.text.clone()), "from cached + sent KV");

    // Both sides hold nothing once the request is over.
    assert_eq!(wait_idle(&mut pc).await.kv_blocks_used, 0);
    assert_eq!(wait_idle(&mut dc).await.kv_blocks_used, 0);

    // A reservation that no prefill follows expires with its lease...
    let res = dc
        .reserve(pb::ReserveRequest {
            request_id: 43,
            prompt_token_ids: ids.clone(),
            lease_ms: 300,
            sampling: Some(greedy(8)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(used_blocks(&mut dc).await as usize >= res.block_ids.len());
    let mut s = dc.decode(pb::DecodeRequest { request_id: 43, ..Default::default() }).await.unwrap().into_inner();
    let e = s.message().await.expect_err("no KV came");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("KV"), "{e:?}");
    assert_eq!(wait_idle(&mut dc).await.kv_blocks_used, 0, "the lease's blocks are back");

    // ...and a cancelled one frees its blocks at once.
    dc.reserve(pb::ReserveRequest {
        request_id: 44,
        prompt_token_ids: ids.clone(),
        lease_ms: 60_000,
        sampling: Some(greedy(8)),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = dc.cancel(pb::CancelRequest { request_id: 44, reason: "test".into() }).await.unwrap().into_inner();
    assert!(c.found && c.freed_blocks > 0);
    assert_eq!(wait_idle(&mut dc).await.kv_blocks_used, 0);

    // Wrong calls get their codes.
    let e = dc.decode(pb::DecodeRequest { request_id: 999, ..Default::default() }).await.expect_err("unknown");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = pc.reserve(pb::ReserveRequest { request_id: 1, prompt_token_ids: ids.clone(), ..Default::default() }).await;
    assert_eq!(e.expect_err("a prefill worker does not reserve").code(), tonic::Code::FailedPrecondition);

    assert!(p.drain(Duration::from_secs(5)).await);
    assert!(d.drain(Duration::from_secs(5)).await);
}

/// Before the fix the prefill worker wrote layer 0 into the victim's cached blocks before
/// the decode worker refused the frame. Now the sender writes only the blocks the receiver
/// accepted the session for (the reservation's freshly allocated tail), so not one byte of
/// the attack lands, and the victim's answer is what it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_aimed_at_cached_blocks_writes_nothing_and_the_victim_answers_as_before() {
    let (p, mut pc) = start_with("prefill-k", Role::Prefill, true).await;
    let (d, mut dc) = start_with("decode-k", Role::Decode, true).await;
    assert!(d.descriptor.kv.local.is_some(), "shared memory is on");

    // The victim's prompt: several full blocks, cached after its first run.
    let engine = Engine::load(&EngineConfig { model_path: model(), threads: 1, ..EngineConfig::default() }).unwrap();
    let question = "Describe the sea at dawn, the gulls over the harbour, the boats going out, and the \
                    fishermen's songs, in a short poem of four lines that rhyme.";
    let ids = engine.prompt_ids(&Prompt::Chat(vec![tandem_text::chat::ChatMessage::new("user", question)])).unwrap();
    drop(engine);
    let (_, first) = disaggregated(&mut dc, &mut pc, 1, &ids, 24).await;
    assert_eq!(wait_idle(&mut dc).await.kv_blocks_used, 0);

    // The decode worker's KV blocks: the shared segment next to its registered socket.
    let uds = &d.descriptor.kv.local.as_ref().unwrap().uds;
    let segment = tandem_kvtransfer::shm::segment_for_socket(uds).unwrap();
    let before = std::fs::read(&segment).unwrap();

    // The attacker reserves the same prompt: the answer names the cached blocks.
    let reserve = pb::ReserveRequest {
        request_id: 2,
        prompt_token_ids: ids.clone(),
        lease_ms: 10_000,
        sampling: Some(greedy(24)),
        ..Default::default()
    };
    let res = dc.reserve(reserve).await.unwrap().into_inner();
    assert!(res.cached_blocks >= 2, "the victim's prefix is cached ({} blocks)", res.cached_blocks);
    // Its own prompt of the same length, prefilled into every block, claiming none is cached.
    let destination = pb::KvDestination {
        worker_id: "decode-k".into(),
        endpoints: res.kv_endpoints.clone(),
        block_ids: res.block_ids.clone(),
        cached_blocks: 0,
        layout: res.layout,
        lease_ms: res.lease_ms,
    };
    let prefill = pb::PrefillRequest {
        request_id: 2,
        prompt_token_ids: ids.iter().map(|t| t + 1).collect(),
        sampling: Some(greedy(24)),
        destination: Some(destination),
        ..Default::default()
    };
    assert!(pc.prefill(prefill).await.is_err(), "a prefill into cached blocks succeeded");
    assert_eq!(p.sender().unwrap().fallbacks(), 0, "the attack went over shared memory, not TCP");
    // Not one byte landed: the first layer named blocks outside the accepted reservation.
    assert!(std::fs::read(&segment).unwrap() == before, "the attack wrote into the decode worker's KV");
    dc.cancel(pb::CancelRequest { request_id: 2, reason: "test".into() }).await.unwrap();
    assert_eq!(wait_idle(&mut dc).await.kv_blocks_used, 0);

    // The victim asks again, from its cached blocks: the same answer.
    let (res, again) = disaggregated(&mut dc, &mut pc, 3, &ids, 24).await;
    assert!(res.cached_blocks >= 2);
    assert_eq!((again.tokens, again.text), (first.tokens, first.text), "the victim's cached KV was changed");

    assert!(p.drain(Duration::from_secs(5)).await);
    assert!(d.drain(Duration::from_secs(5)).await);
}
