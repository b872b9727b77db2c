//! Table tests of `choice`: a choice's run across fake workers: migration, the KV failure policies,
//! the wait for KV room, and a client that leaves while `Reserve` is in flight. Each runs a
//! whole request through `relay::RequestRelay`, as a front door starts it, with the workers
//! replaced by [`Fake`]s that record what they were asked.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_cluster::{KvEndpoints, ModelInfo, Role, WorkerDescriptor, WorkerId};
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::worker::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::members::Members;
use crate::policy::{Candidate, RoutingPolicy};
use crate::recovery::KvFailurePolicy;
use crate::relay::RequestRelay;
use crate::routing::Routing;
use crate::stall::Outbox;
use crate::validate::Validated;
use crate::worker::{DecodeStream, WorkerApi};

const MODEL: &str = "fake-model";
const PROMPT: [u32; 4] = [1, 2, 3, 4];
/// Token `i` of a choice (counted from its start, across attempts) is `FIRST_TOKEN + i`.
const FIRST_TOKEN: u32 = 100;

/// What a fake worker was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Reserve { rid: u64, prompt: usize, resumed: u32 },
    Prefill { rid: u64, prompt: usize },
    Decode { rid: u64, prompt: usize, resumed: u32, recompute: bool },
    Cancel { rid: u64 },
}

/// How a fake worker behaves.
#[derive(Clone, Default)]
struct Script {
    /// Decode: the stream fails (the worker died) after this many tokens.
    die_after: Option<u32>,
    /// Prefill: fails, as a broken KV transfer (`true`) or as a dead worker (`false`).
    prefill_fails: Option<bool>,
    /// Reserve: blocks until the request is dropped.
    reserve_hangs: bool,
    /// Reserve: reservations held at once at most (a pool this full answers
    /// RESOURCE_EXHAUSTED); `None`: no bound.
    capacity: Option<usize>,
    /// Prompt tokens reported reused from the prefix cache, by call: the `i`th prefill (or
    /// local decode) reports `cached[i]` (the last one again past the end; none: 0).
    cached: Vec<u32>,
}

struct FakeState {
    calls: Vec<Call>,
    /// Reservations held, by request id, until the stream ends or a Cancel.
    held: HashMap<u64, ()>,
}

/// A worker that records its calls and answers from its [`Script`]. A decode stream sends
/// one token a chunk while `open` is true, up to the request's `max_tokens`.
#[derive(Clone)]
struct Fake {
    script: Script,
    state: Arc<Mutex<FakeState>>,
    open: watch::Receiver<bool>,
    gate: Arc<watch::Sender<bool>>,
}

impl Fake {
    fn new(script: Script) -> Fake {
        let (gate, open) = watch::channel(true);
        let state = FakeState { calls: Vec::new(), held: HashMap::new() };
        Fake { script, state: Arc::new(Mutex::new(state)), open, gate: Arc::new(gate) }
    }

    fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    fn held(&self) -> usize {
        self.state.lock().unwrap().held.len()
    }

    /// What the call just recorded reports as reused (see `Script::cached`).
    fn cached_now(&self, of: impl Fn(&Call) -> bool) -> u32 {
        let n = self.calls().iter().filter(|c| of(c)).count();
        self.script.cached.get(n.saturating_sub(1)).or(self.script.cached.last()).copied().unwrap_or(0)
    }

    fn record(&self, call: Call) {
        self.state.lock().unwrap().calls.push(call);
    }

    /// Holds decode streams (`false`) or lets them run (`true`).
    fn set_open(&self, open: bool) {
        self.gate.send_replace(open);
    }
}

#[tonic::async_trait]
impl WorkerApi for Fake {
    async fn reserve(&self, req: pb::ReserveRequest) -> Result<pb::ReserveResponse, Status> {
        let rid = req.request_id;
        self.record(Call::Reserve { rid, prompt: req.prompt_token_ids.len(), resumed: req.resumed_tokens });
        {
            let mut st = self.state.lock().unwrap();
            if self.script.capacity.is_some_and(|c| st.held.len() >= c) {
                return Err(Status::resource_exhausted("no free KV blocks"));
            }
            st.held.insert(rid, ());
        }
        if self.script.reserve_hangs {
            std::future::pending::<()>().await;
        }
        Ok(pb::ReserveResponse::default())
    }

    async fn prefill(&self, req: pb::PrefillRequest) -> Result<pb::PrefillResponse, Status> {
        self.record(Call::Prefill { rid: req.request_id, prompt: req.prompt_token_ids.len() });
        match self.script.prefill_fails {
            Some(true) => {
                let mut s = Status::unavailable("the KV transfer broke");
                s.metadata_mut().insert(tandem_proto::FAULT_METADATA, "kv".parse().unwrap());
                Err(s)
            }
            Some(false) => Err(Status::unavailable("the prefill worker died")),
            None => Ok(pb::PrefillResponse {
                timing: Some(pb::PrefillTiming { compute_time_ms: 1.0, ..Default::default() }),
                cached_tokens: self.cached_now(|c| matches!(c, Call::Prefill { .. })),
                ..Default::default()
            }),
        }
    }

    async fn decode(&self, req: pb::DecodeRequest) -> Result<DecodeStream, Status> {
        let (rid, resumed) = (req.request_id, req.resumed_tokens);
        let prompt = req.prompt_token_ids.len();
        self.record(Call::Decode { rid, prompt, resumed, recompute: req.recompute });
        let max_tokens = req.sampling.map_or(1, |s| s.max_tokens);
        // A local generation (a prompt to prefill here) says what it reused on its first message.
        let cached = if prompt > 0 { self.cached_now(|c| matches!(c, Call::Decode { prompt: 1.., .. })) } else { 0 };
        let (tx, rx) = mpsc::channel(4);
        let (me, mut open) = (self.clone(), self.open.clone());
        tokio::spawn(async move {
            for i in 0..max_tokens {
                if open.wait_for(|o| *o).await.is_err() {
                    return;
                }
                if me.script.die_after == Some(i) {
                    let _ = tx.send(Err(Status::unavailable("connection reset"))).await;
                    return;
                }
                let last = i + 1 == max_tokens;
                if last {
                    me.state.lock().unwrap().held.remove(&rid);
                }
                let finish = if last { api::FinishReason::Length } else { api::FinishReason::Unspecified };
                let token = FIRST_TOKEN + resumed + i;
                let d = pb::DecodeResponse {
                    token_ids: vec![token],
                    text: format!("<{token}>"),
                    finish_reason: finish as i32,
                    cached_tokens: if i == 0 { cached } else { 0 },
                    ..Default::default()
                };
                if tx.send(Ok(d)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn cancel(&self, req: pb::CancelRequest) -> Result<pb::CancelResponse, Status> {
        self.record(Call::Cancel { rid: req.request_id });
        let found = self.state.lock().unwrap().held.remove(&req.request_id).is_some();
        Ok(pb::CancelResponse { found, freed_blocks: 0 })
    }
}

/// Always the first candidate (the workers in id order), so each test knows where a
/// choice goes.
#[derive(Debug)]
struct First;

impl RoutingPolicy for First {
    fn name(&self) -> &'static str {
        "first"
    }
    fn pick_prefill(&self, _: &[Candidate<'_>], _: usize) -> usize {
        0
    }
    fn pick_decode(&self, _: &[Candidate<'_>], _: usize) -> usize {
        0
    }
}

/// A cluster of fake workers: `(id, role, script)` each.
fn cluster(workers: &[(&str, Role, Script)]) -> (Routing, HashMap<String, Fake>) {
    let members = Members::new(None, None, Default::default());
    let mut fakes = HashMap::new();
    for (id, role, script) in workers {
        let desc = WorkerDescriptor {
            id: WorkerId::new(*id).unwrap(),
            role: *role,
            grpc_addr: "127.0.0.1:1".into(),
            kv: KvEndpoints { tcp: "127.0.0.1:2".parse().unwrap(), local: None },
            model: ModelInfo { name: MODEL.into(), fingerprint: 7 },
            block_size: 16,
            hash_scheme: Some("sha256-chain-v1".into()),
            context_length: 4096,
            lease: tandem_proto::ids::LeaseId::from_wire(1),
        };
        let fake = Fake::new(script.clone());
        members.join_fake(desc, Arc::new(fake.clone()));
        fakes.insert(id.to_string(), fake);
    }
    (Routing::new(members, Box::new(First)), fakes)
}

fn request(max_tokens: u32, kv_failure_policy: Option<KvFailurePolicy>) -> Validated {
    Validated {
        model: MODEL.into(),
        prompt: PROMPT.to_vec(),
        sampling: pb::SamplingParams { max_tokens, ..Default::default() },
        n: 1,
        request_id: "req-test".into(),
        cache_salt: None,
        priority: 0,
        kv_failure_policy,
        slo_ttft: None,
        tenant: None,
        predicted_output: None,
    }
}

/// What the client got: the tokens in order, the finish reason and usage of the last
/// chunk, and the error that ended the stream, if one did.
#[derive(Debug, Default)]
struct Seen {
    tokens: Vec<u32>,
    finish: i32,
    usage: Option<api::Usage>,
    error: Option<Status>,
}

type ClientStream = mpsc::Receiver<Result<api::GenerateStreamResponse, Status>>;

/// Starts `v` on `routing` as a front door would; the client's end of the stream.
fn start(routing: &Arc<Routing>, v: Validated) -> (ClientStream, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let relay = RequestRelay {
        routing: routing.clone(),
        v: Arc::new(v),
        tx: Outbox::new(tx, Duration::from_secs(30)),
        accepted: Instant::now(),
        deadline: Some(Duration::from_secs(20)),
        first_token_timeout: Duration::from_secs(20),
        api: "grpc",
    };
    (rx, tokio::spawn(relay.run()))
}

async fn read(mut rx: ClientStream) -> Seen {
    let mut seen = Seen::default();
    while let Some(m) = rx.recv().await {
        match m {
            Ok(m) => {
                seen.tokens.extend(m.token_ids);
                seen.finish = m.finish_reason;
                seen.usage = m.usage.or(seen.usage);
            }
            Err(e) => seen.error = Some(e),
        }
    }
    seen
}

async fn run(routing: &Arc<Routing>, v: Validated) -> Seen {
    let (rx, task) = start(routing, v);
    let seen = read(rx).await;
    task.await.unwrap();
    seen
}

fn tokens(from: u32, n: u32) -> Vec<u32> {
    (FIRST_TOKEN + from..FIRST_TOKEN + from + n).collect()
}

/// Waits (a while, not forever) until `f` holds.
async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} did not happen within 5 s");
}

fn decodes(f: &Fake) -> Vec<Call> {
    f.calls().into_iter().filter(|c| matches!(c, Call::Decode { .. })).collect()
}

fn reserves(f: &Fake) -> Vec<Call> {
    f.calls().into_iter().filter(|c| matches!(c, Call::Reserve { .. })).collect()
}

#[tokio::test]
async fn a_decoding_choice_migrates_to_another_decode_worker_without_a_gap() {
    let dies = Script { die_after: Some(3), ..Script::default() };
    // (migration limit, what the client sees, reservations asked of the second decode worker)
    type Case = (usize, Result<Vec<u32>, &'static str>, usize);
    let cases: Vec<Case> = vec![
        // Three tokens from decode-a, then decode-b resumes from the prompt plus those three.
        (3, Ok(tokens(0, 8)), 1),
        (1, Ok(tokens(0, 8)), 1),
        // No migration: the client has its three tokens, then UNAVAILABLE naming the worker.
        (0, Err("decode worker decode-a"), 0),
    ];
    for (limit, want, asked_b) in cases {
        let (mut routing, fakes) = cluster(&[
            ("prefill-a", Role::Prefill, Script::default()),
            ("decode-a", Role::Decode, dies.clone()),
            ("decode-b", Role::Decode, Script::default()),
        ]);
        routing.migration_limit = limit;
        let routing = Arc::new(routing);
        let seen = run(&routing, request(8, None)).await;
        match want {
            Ok(want) => {
                assert_eq!(seen.tokens, want, "limit {limit}: every token once, in order");
                assert!(seen.error.is_none(), "limit {limit}: {:?}", seen.error);
                assert_eq!(seen.finish, api::FinishReason::Length as i32);
                let usage = seen.usage.expect("usage on the last chunk");
                assert_eq!((usage.prompt_tokens, usage.completion_tokens), (4, 8));
            }
            Err(msg) => {
                assert_eq!(seen.tokens, tokens(0, 3), "what was sent before the worker died stays sent");
                let e = seen.error.expect("an error");
                assert_eq!(e.code(), tonic::Code::Unavailable);
                assert!(e.message().contains(msg), "{e:?}");
            }
        }
        let b = &fakes["decode-b"];
        assert_eq!(reserves(b).len(), asked_b, "limit {limit}: {:?}", b.calls());
        if asked_b > 0 {
            // The prompt plus the three tokens sent, which the worker knows as resumed.
            assert!(matches!(reserves(b)[0], Call::Reserve { prompt: 7, resumed: 3, .. }), "{:?}", b.calls());
            let prefill = fakes["prefill-a"].calls();
            assert!(prefill.contains(&Call::Prefill { rid: rid_of(&reserves(b)[0]), prompt: 7 }), "{prefill:?}");
        }
        for (id, f) in &fakes {
            assert_eq!(f.held(), 0, "{id} holds no reservation");
        }
    }
}

fn rid_of(call: &Call) -> u64 {
    match call {
        Call::Reserve { rid, .. } | Call::Prefill { rid, .. } | Call::Decode { rid, .. } | Call::Cancel { rid } => *rid,
    }
}

#[tokio::test]
async fn every_kv_failure_policy_does_what_it_says() {
    use KvFailurePolicy::*;
    /// How the choice ends up served.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Served {
        /// Recomputed on decode-a, which prefills the prompt itself.
        Recomputed,
        /// Prefilled again on prefill-b.
        Retried,
        /// UNAVAILABLE naming the policy.
        Failed(&'static str),
    }
    let broken_kv = Script { prefill_fails: Some(true), ..Script::default() };
    let dead = Script { prefill_fails: Some(false), ..Script::default() };
    // (router's policy, the request's own, how prefill-a fails, a second prefill worker, outcome)
    let cases: Vec<(KvFailurePolicy, Option<KvFailurePolicy>, &Script, bool, Served)> = vec![
        (Fail, None, &broken_kv, true, Served::Failed("KV failure policy fail)")),
        (Fail, None, &dead, true, Served::Failed("KV failure policy fail)")),
        (Recompute, None, &broken_kv, true, Served::Recomputed),
        (Recompute, None, &dead, false, Served::Recomputed),
        (Retry, None, &broken_kv, true, Served::Retried),
        (Retry, None, &dead, true, Served::Retried),
        // Retry with no other prefill worker recomputes.
        (Retry, None, &broken_kv, false, Served::Recomputed),
        // The request's own policy wins over the router's.
        (Retry, Some(Fail), &broken_kv, true, Served::Failed("KV failure policy fail)")),
        (Fail, Some(Recompute), &broken_kv, true, Served::Recomputed),
    ];
    for (default, own, prefill_a, second, want) in cases {
        let mut workers =
            vec![("prefill-a", Role::Prefill, prefill_a.clone()), ("decode-a", Role::Decode, Script::default())];
        if second {
            workers.push(("prefill-b", Role::Prefill, Script::default()));
        }
        let (mut routing, fakes) = cluster(&workers);
        routing.kv_failure_policy = default;
        let routing = Arc::new(routing);
        let seen = run(&routing, request(5, own)).await;
        let case = format!("{default} / {own:?} / second prefill worker {second}");
        let recomputed: Vec<Call> = decodes(&fakes["decode-a"])
            .into_iter()
            .filter(|c| matches!(c, Call::Decode { recompute: true, .. }))
            .collect();
        let retried = fakes.get("prefill-b").map_or(0, |f| f.calls().len());
        match want {
            Served::Failed(msg) => {
                let e = seen.error.unwrap_or_else(|| panic!("{case}: no error"));
                assert_eq!(e.code(), tonic::Code::Unavailable, "{case}");
                assert!(e.message().contains(msg), "{case}: {e:?}");
                assert!(recomputed.is_empty() && retried == 0, "{case}: nothing tried again");
            }
            Served::Recomputed => {
                assert_eq!(seen.tokens, tokens(0, 5), "{case}: {:?}", seen.error);
                // The whole prompt goes to the decode worker, which computes it.
                assert!(
                    matches!(recomputed[..], [Call::Decode { prompt: 4, resumed: 0, .. }]),
                    "{case}: {recomputed:?}"
                );
                assert_eq!(retried, 0, "{case}: no other prefill worker was asked");
            }
            Served::Retried => {
                assert_eq!(seen.tokens, tokens(0, 5), "{case}: {:?}", seen.error);
                assert!(recomputed.is_empty(), "{case}: {recomputed:?}");
                assert!(
                    fakes["prefill-b"].calls().iter().any(|c| matches!(c, Call::Prefill { prompt: 4, .. })),
                    "{case}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_choice_waits_for_kv_room_and_is_refused_past_kv_wait() {
    // (kv_wait, whether the first request frees its blocks, outcome of the second)
    let cases: Vec<(Duration, bool, Result<(), &str>)> = vec![
        (Duration::from_secs(30), true, Ok(())),
        (Duration::from_millis(300), false, Err("no decode worker had room within")),
        // No waiting at all: refused at once, with the worker's own words.
        (Duration::ZERO, false, Err("no free KV blocks")),
    ];
    for (kv_wait, freed, want) in cases {
        let full_at_one = Script { capacity: Some(1), ..Script::default() };
        let (mut routing, fakes) =
            cluster(&[("prefill-a", Role::Prefill, Script::default()), ("decode-a", Role::Decode, full_at_one)]);
        routing.kv_wait = kv_wait;
        let routing = Arc::new(routing);
        let decode = fakes["decode-a"].clone();
        // The first request takes the pool's only room and holds it while its stream is held.
        decode.set_open(false);
        let (first_rx, first) = start(&routing, request(2, None));
        until("the first reservation", || decode.held() == 1).await;
        let t0 = Instant::now();
        let (second_rx, second) = start(&routing, request(3, None));
        let second_seen = tokio::spawn(read(second_rx));
        if freed {
            until("the second choice waiting for room", || routing.kv_waiting.load(Ordering::SeqCst) == 1).await;
            decode.set_open(true);
        }
        let seen = second_seen.await.unwrap();
        second.await.unwrap();
        match want {
            Ok(()) => {
                assert_eq!(seen.tokens, tokens(0, 3), "{kv_wait:?}: {:?}", seen.error);
                assert!(reserves(&decode).len() >= 3, "refused, then served: {:?}", decode.calls());
            }
            Err(msg) => {
                let e = seen.error.unwrap_or_else(|| panic!("{kv_wait:?}: served"));
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains(msg), "{kv_wait:?}: {e:?}");
                assert_eq!(e.metadata().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
                assert!(t0.elapsed() >= kv_wait, "refused after {:?}, before kv_wait {kv_wait:?}", t0.elapsed());
            }
        }
        assert_eq!(routing.kv_waiting.load(Ordering::SeqCst), 0, "no choice counted as waiting");
        decode.set_open(true);
        let first_seen = read(first_rx).await;
        first.await.unwrap();
        assert_eq!(first_seen.tokens, tokens(0, 2));
        assert_eq!(decode.held(), 0, "every reservation freed");
    }
}

#[tokio::test]
async fn a_client_that_leaves_while_reserve_is_in_flight_cancels_the_reservation() {
    let hangs = Script { reserve_hangs: true, ..Script::default() };
    let (routing, fakes) =
        cluster(&[("prefill-a", Role::Prefill, Script::default()), ("decode-a", Role::Decode, hangs)]);
    let routing = Arc::new(routing);
    let (rx, task) = start(&routing, request(4, None));
    let (decode, prefill) = (&fakes["decode-a"], &fakes["prefill-a"]);
    until("the reservation", || decode.held() == 1).await;
    let rid = rid_of(&reserves(decode)[0]);
    // The client leaves: the request ends, and with it the choice waiting on `Reserve`.
    drop(rx);
    task.await.unwrap();
    until("the decode worker's Cancel", || decode.calls().contains(&Call::Cancel { rid })).await;
    until("the prefill worker's Cancel", || prefill.calls().contains(&Call::Cancel { rid })).await;
    assert_eq!(decode.held(), 0, "the reservation is freed");
    assert_eq!(decodes(decode), vec![], "no stream was opened");
    assert_eq!(prefill.calls(), vec![Call::Cancel { rid }], "nothing was prefilled");
    assert!(
        routing.members.snapshot().iter().all(|w| w.inflight == 0),
        "no worker counts the request in flight: {:?}",
        routing.members.snapshot().iter().map(|w| (w.desc.id.clone(), w.inflight)).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn usage_counts_the_prompt_tokens_the_prefill_side_did_not_compute_once() {
    let dies = Script { die_after: Some(3), ..Script::default() };
    let cached = |c: &[u32]| Script { cached: c.to_vec(), ..Script::default() };
    // (workers, cached_tokens in the usage, why)
    let cases: Vec<(Vec<(&str, Role, Script)>, u32, &str)> = vec![
        (
            vec![("prefill-a", Role::Prefill, cached(&[3])), ("decode-a", Role::Decode, cached(&[2]))],
            3,
            "disaggregated: the prefill worker's reuse, not the decode worker's",
        ),
        (vec![("both-a", Role::Both, cached(&[2]))], 2, "local: the worker that prefilled"),
        (
            vec![
                ("prefill-a", Role::Prefill, cached(&[1, 3])),
                ("decode-a", Role::Decode, dies.clone()),
                ("decode-b", Role::Decode, Script::default()),
            ],
            1,
            "migrated after tokens were sent: the first prefill's only, not added to nor replaced by the re-prefill's",
        ),
        (
            vec![
                ("both-a", Role::Both, Script { die_after: Some(2), cached: vec![2, 3], ..Script::default() }),
                ("both-b", Role::Both, cached(&[3])),
            ],
            2,
            "local, migrated: the first worker's",
        ),
        (
            vec![("prefill-a", Role::Prefill, cached(&[99])), ("decode-a", Role::Decode, Script::default())],
            4,
            "never more than the prompt, whatever a worker says",
        ),
    ];
    for (workers, want, why) in cases {
        let (routing, _fakes) = cluster(&workers);
        let seen = run(&Arc::new(routing), request(8, None)).await;
        assert!(seen.error.is_none(), "{why}: {:?}", seen.error);
        assert_eq!(seen.tokens, tokens(0, 8), "{why}");
        let usage = seen.usage.expect("usage on the last chunk");
        assert_eq!(usage.cached_tokens, want, "{why}");
        assert!(usage.cached_tokens <= usage.prompt_tokens, "{why}");
    }
}

/// A decode worker that answers but takes no new work for a moment (fenced while it
/// registers under a new lease, changing role) is waited for, up to `PAUSED_WAIT`; one that
/// stays paused fails the request then, naming the want of a worker.
#[tokio::test]
async fn a_choice_waits_for_a_paused_decode_worker_and_fails_when_it_stays_paused() {
    for comes_back in [true, false] {
        let (routing, fakes) =
            cluster(&[("prefill-a", Role::Prefill, Script::default()), ("decode-a", Role::Decode, Script::default())]);
        let routing = Arc::new(routing);
        let decode_id = WorkerId::new("decode-a").unwrap();
        routing.members.answered_fake(&decode_id, false);
        let t0 = Instant::now();
        let (rx, task) = start(&routing, request(3, None));
        let seen = tokio::spawn(read(rx));
        if comes_back {
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert!(reserves(&fakes["decode-a"]).is_empty(), "nothing reserved on a paused worker");
            routing.members.answered_fake(&decode_id, true);
        }
        let seen = seen.await.unwrap();
        task.await.unwrap();
        if comes_back {
            assert_eq!(seen.tokens, tokens(0, 3), "{:?}", seen.error);
        } else {
            let e = seen.error.expect("no worker came back");
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
            assert!(e.message().contains("no decode worker serves"), "{e:?}");
            assert!(t0.elapsed() >= crate::choice::PAUSED_WAIT, "failed after {:?}", t0.elapsed());
        }
    }
}
