//! Live migration end to end, with real processes, etcd and the real model: running
//! decodes move to another decode worker with their KV (nothing recomputed) when their
//! worker drains (SIGTERM), when an operator asks (`tandem worker migrate`), and the
//! failures on the way leave every request correct and no block held.

mod harness;

use std::time::{Duration, Instant};

use harness::*;
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::worker::v1 as pb;

/// Request `i` of a run: greedy for most, seeded sampling (with penalties) for every fifth,
/// constrained by a regex for every seventh (its matcher rebuilt from the moved tokens on
/// the new worker); long enough to be running when the move comes.
fn request(i: usize, max_tokens: u32) -> api::GenerateRequest {
    let topics = ["rivers", "mountains", "lanterns", "copper", "gardens", "harbors", "meadows", "orchards"];
    let text = format!("Story {i}: write a long story about {} and the people near them.", topics[i % topics.len()]);
    let mut r = chat(&text, max_tokens);
    let s = r.sampling.as_mut().unwrap();
    if i % 7 == 6 {
        // At least 300 characters of words: it runs to max_tokens like the others.
        s.guide = Some(api::Guide { kind: Some(api::guide::Kind::Regex("[A-Za-z][a-z ,]{300,600}\\.".into())) });
        return r;
    }
    s.ignore_eos = true;
    if i % 5 == 4 {
        s.temperature = Some(0.8);
        s.top_p = Some(0.95);
        s.seed = Some(1000 + i as u64);
        s.presence_penalty = Some(0.5);
        s.frequency_penalty = Some(0.3);
    }
    r
}

/// Streams `n` requests at once; each one's text and token ids, and the prompt tokens.
async fn run(addr: &str, n: usize, max_tokens: u32) -> (Vec<(String, Vec<u32>)>, u64) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = client(&addr).await;
            stream(&mut c, request(i, max_tokens)).await
        }));
    }
    let (mut out, mut prompt) = (Vec::new(), 0);
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap().unwrap_or_else(|e| panic!("request {i} failed: {e:?}"));
        prompt += got.usage.as_ref().map_or(0, |u| u.prompt_tokens as u64);
        out.push((got.text, got.token_ids));
    }
    (out, prompt)
}

#[test]
fn a_draining_decode_worker_moves_its_streams_live_and_nothing_is_recomputed() {
    let _g = serial();
    const STREAMS: usize = 40;
    const TOKENS: u32 = 64;
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let (_p, p_addr) = start_worker(&etcd, &cluster, "prefill", "prefill-a", &[]);
    let (mut da, da_addr) = start_worker(&etcd, &cluster, "decode", "decode-a", &[]);
    let (_db, db_addr) = start_worker(&etcd, &cluster, "decode", "decode-b", &[]);
    let (router, addr) = start_router(&etcd, &cluster, &["--policy", "least-loaded"]);
    for id in ["prefill-a", "decode-a", "decode-b"] {
        router.wait_event("worker joined", &[("worker", id)], Duration::from_secs(30));
    }
    let http = router.addr_after("tandem: router", "http");
    let rt = rt();
    rt.block_on(async {
        let (want, _) = run(&addr, STREAMS, TOKENS).await;
        let before = http_get(&http, "/metrics");
        let queried = stats(&p_addr).await.prefix_cache_queried_tokens;
        // Again, and decode-a is stopped (SIGTERM) while its streams run.
        let a2 = addr.clone();
        let runs = tokio::spawn(async move { run(&a2, STREAMS, TOKENS).await });
        let end = Instant::now() + Duration::from_secs(120);
        while stats(&da_addr).await.running < 4 {
            assert!(Instant::now() < end, "decode-a never ran streams");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        da.signal("TERM");
        let (got, prompt_tokens) = runs.await.unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "stream {i} differs from the undisturbed run");
        }
        let code = tokio::task::spawn_blocking(move || da.wait_exit(Duration::from_secs(60))).await.unwrap();
        assert_eq!(code, Some(0), "decode-a exits cleanly");
        let after = http_get(&http, "/metrics");
        let delta = |name: &str, labels: &[(&str, &str)]| metric(&after, name, labels) - metric(&before, name, labels);
        let moved = delta("tandem_live_migrations_total", &[("outcome", "moved")]);
        assert!(moved >= 1.0, "no stream moved live:\n{after}");
        assert_eq!(delta("tandem_live_migrations_total", &[("outcome", "recomputed")]), 0.0);
        assert_eq!(delta("tandem_migrations_total", &[]), 0.0, "a stream was moved by recompute");
        assert!(delta("tandem_live_migration_bytes_total", &[]) > 0.0);
        assert!(metric(&after, "tandem_live_migration_downtime_seconds_count", &[]) >= moved);
        // Every prompt was computed once, by the prefill worker: no token was recomputed.
        let computed = stats(&p_addr).await.prefix_cache_queried_tokens - queried;
        assert_eq!(computed, prompt_tokens, "the prefill worker computed more than the prompts");
        // The moved streams' blocks are free on their new worker.
        let s = stats(&db_addr).await;
        assert_eq!((s.running, s.waiting, s.kv_blocks_used), (0, 0, 0), "decode-b holds blocks: {s:?}");
        eprintln!("{moved} of {STREAMS} streams moved live off the draining worker");
    });
}

/// A prefill worker and decode worker `decode-a` behind a router; `decode-b` joins later,
/// its KV listener behind a proxy that can damage or hold what is sent to it (shared
/// memory off, so every byte crosses it).
struct Setup {
    etcd: Etcd,
    cluster: String,
    router: Proc,
    addr: String,
    _p: Proc,
    p_addr: String,
    a: Proc,
    a_addr: String,
}

impl Setup {
    /// The setup, the runtime the tests run in, and the proxy decode-b is reached through
    /// (with decode-b's KV port).
    fn with_proxy() -> (Setup, tokio::runtime::Runtime, Proxy, u16) {
        let s = Setup::start();
        let rt = rt();
        let kv_port = free_port();
        let proxy = rt.block_on(Proxy::start(format!("127.0.0.1:{kv_port}")));
        (s, rt, proxy, kv_port)
    }

    fn start() -> Setup {
        let etcd = Etcd::start();
        let cluster = format!("e2e{}", free_port());
        let (_p, p_addr) = start_worker(&etcd, &cluster, "prefill", "prefill-a", &[]);
        let (a, a_addr) = start_worker(&etcd, &cluster, "decode", "decode-a", &[]);
        let (router, addr) = start_router(&etcd, &cluster, &[]);
        for id in ["prefill-a", "decode-a"] {
            router.wait_event("worker joined", &[("worker", id)], Duration::from_secs(30));
        }
        Setup { etcd, cluster, router, addr, _p, p_addr, a, a_addr }
    }

    /// Starts `decode-b` with its KV reached through `proxy` (listening on `kv_port`).
    fn start_b(&self, proxy: &Proxy, kv_port: u16) -> (Proc, String) {
        let kv_listen = format!("127.0.0.1:{kv_port}");
        let extra = ["--no-shm", "--kv-listen", &kv_listen, "--kv-advertise", &proxy.addr];
        let b = start_worker(&self.etcd, &self.cluster, "decode", "decode-b", &extra);
        self.router.wait_event("worker joined", &[("worker", "decode-b")], Duration::from_secs(30));
        b
    }
}

/// One long greedy story: long enough a prompt that its whole blocks are pre-copied, and
/// long enough an answer to be running when the move comes.
fn story() -> api::GenerateRequest {
    story_of(240)
}

/// `story` with `max_tokens` of answer.
fn story_of(max_tokens: u32) -> api::GenerateRequest {
    let preamble = "You are a patient storyteller. Tell it slowly, with many small details. ".repeat(6);
    let mut r = chat(&format!("{preamble}Tell me a story about a lighthouse keeper."), max_tokens);
    r.sampling.as_mut().unwrap().ignore_eos = true;
    r
}

/// `tandem worker migrate` as an operator runs it; its success and output.
fn migrate(worker: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["worker", "migrate", "--worker", worker];
    args.extend_from_slice(extra);
    let out = tandem_serving(&args, &[]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Starts the story on `decode-a` and waits until it decodes there.
async fn story_running(s: &Setup) -> tokio::task::JoinHandle<Result<Streamed, tonic::Status>> {
    let addr = s.addr.clone();
    let run = tokio::spawn(async move { stream(&mut client(&addr).await, story()).await });
    let end = Instant::now() + Duration::from_secs(60);
    while stats(&s.a_addr).await.running == 0 {
        assert!(Instant::now() < end, "the story never ran on decode-a");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A few tokens in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    run
}

/// Asks decode-a to move one stream with the proxy set to hold the transfer; returns once
/// the move's KV is held there.
async fn move_held(s: &Setup, proxy: &Proxy) {
    proxy.arm(WireFault::Stall(4_000));
    let a = s.a_addr.clone();
    let (ok, said) = tokio::task::spawn_blocking(move || migrate(&a, &["--count", "1"])).await.unwrap();
    assert!(ok, "{said}");
    wait_stalled(proxy).await;
}

async fn wait_stalled(proxy: &Proxy) {
    let end = Instant::now() + Duration::from_secs(30);
    while !proxy.is_stalled() {
        assert!(Instant::now() < end, "nothing reached the proxy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An operator moves a running stream to a named worker: a first try whose KV is
/// corrupted on the wire is given up (the stream stays and goes on), a second one moves
/// it. The client sees the undisturbed text, and no worker holds anything after.
#[test]
fn an_operator_moves_a_stream_and_a_corrupted_transfer_leaves_it_where_it_was() {
    let _g = serial();
    let (s, rt, proxy, kv_port) = Setup::with_proxy();
    let http = s.router.addr_after("tandem: router", "http");
    rt.block_on(async {
        let want = stream(&mut client(&s.addr).await, story()).await.unwrap();
        let (_b, b_addr) = s.start_b(&proxy, kv_port);
        let run = story_running(&s).await;
        // Past the session's handshake, into the first blocks.
        proxy.arm(WireFault::Corrupt(4_000));
        let a = s.a_addr.clone();
        let (ok, said) =
            tokio::task::spawn_blocking(move || migrate(&a, &["--count", "1", "--to", "decode-b"])).await.unwrap();
        assert!(ok && said.contains("1 request(s) asked to move"), "{said}");
        let end = Instant::now() + Duration::from_secs(30);
        while metric(&http_get(&http, "/metrics"), "tandem_live_migrations_total", &[("outcome", "stayed")]) < 1.0 {
            assert!(Instant::now() < end, "the corrupted move was never given up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(proxy.applied.lock().unwrap().len(), 1, "the fault hit the move's KV");
        let scrape = http_get(&http, "/metrics");
        assert_eq!(metric(&scrape, "tandem_live_migrations_total", &[("reason", "transfer_failed")]), 1.0, "{scrape}");
        assert_eq!(stats(&s.a_addr).await.running, 1, "the stream stayed on decode-a");
        // Again, on a clean wire: it moves.
        let a = s.a_addr.clone();
        let (ok, said) =
            tokio::task::spawn_blocking(move || migrate(&a, &["--count", "1", "--to", "decode-b"])).await.unwrap();
        assert!(ok && said.contains("1 request(s) asked to move"), "{said}");
        let got = run.await.unwrap().unwrap();
        assert_eq!((&got.text, &got.token_ids), (&want.text, &want.token_ids), "the moved stream's text");
        let scrape = http_get(&http, "/metrics");
        assert_eq!(metric(&scrape, "tandem_live_migrations_total", &[("outcome", "moved")]), 1.0, "{scrape}");
        assert_eq!(metric(&scrape, "tandem_migrations_total", &[]), 0.0, "nothing was recomputed");
        assert_idle(&wait_idle(&[s.a_addr.clone(), b_addr.clone(), s.p_addr.clone()]).await);
        // A stranger cannot ask for moves.
        let mut stranger = worker_client_with(&s.a_addr, None).await;
        let req = pb::MigrateRequest { step: pb::MigrateStep::Request as i32, count: 1, ..Default::default() };
        assert_eq!(stranger.migrate(req).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    });
}

/// The destination dies while the pre-copy is on its way to it: the move is given up, the
/// stream goes on where it was, and the source holds nothing after.
#[test]
fn a_destination_that_dies_during_the_move_leaves_the_stream_where_it_was() {
    let _g = serial();
    let (s, rt, proxy, kv_port) = Setup::with_proxy();
    rt.block_on(async {
        let want = stream(&mut client(&s.addr).await, story()).await.unwrap();
        let (mut b, _) = s.start_b(&proxy, kv_port);
        let run = story_running(&s).await;
        move_held(&s, &proxy).await;
        b.kill();
        proxy.release();
        let got = run.await.unwrap().unwrap();
        assert_eq!((&got.text, &got.token_ids), (&want.text, &want.token_ids));
        assert_idle(&wait_idle(&[s.a_addr.clone(), s.p_addr.clone()]).await);
    });
}

/// The source dies during the pre-copy: the stream is recomputed on the destination (the
/// old way), the client sees the undisturbed text, and no worker holds anything after.
#[test]
fn a_source_that_dies_during_the_move_has_its_stream_recomputed() {
    let _g = serial();
    let (mut s, rt, proxy, kv_port) = Setup::with_proxy();
    rt.block_on(async {
        let want = stream(&mut client(&s.addr).await, story()).await.unwrap();
        let (_b, b_addr) = s.start_b(&proxy, kv_port);
        let run = story_running(&s).await;
        move_held(&s, &proxy).await;
        s.a.kill();
        proxy.release();
        let got = run.await.unwrap().unwrap();
        assert_eq!((&got.text, &got.token_ids), (&want.text, &want.token_ids));
        assert_idle(&wait_idle(&[b_addr.clone(), s.p_addr.clone()]).await);
    });
}

/// The client goes away while its stream is moving: both workers free everything.
#[test]
fn a_client_that_leaves_during_the_move_frees_both_workers() {
    let _g = serial();
    let (s, rt, proxy, kv_port) = Setup::with_proxy();
    rt.block_on(async {
        let (_b, b_addr) = s.start_b(&proxy, kv_port);
        let run = story_running(&s).await;
        move_held(&s, &proxy).await;
        // The move holds blocks on both sides now: the source's request, the destination's
        // reservation.
        assert!(stats(&b_addr).await.kv_blocks_used > 0, "nothing reserved on decode-b");
        run.abort();
        let _ = run.await;
        proxy.release();
        assert_idle(&wait_idle(&[s.a_addr.clone(), b_addr.clone(), s.p_addr.clone()]).await);
    });
}

/// The planner evens out KV use: a decode worker with a small pool runs four long stories
/// (half its blocks, and growing) when a second, empty one joins; the planner moves some of
/// them there, live, and every story reads as if nothing had moved. The stories are long
/// enough (480 tokens, of which about 290 are still to come when the second worker starts)
/// that its start-up is over well before they end, however slow the machine.
#[test]
fn the_planner_moves_decodes_off_a_worker_whose_kv_fills_up() {
    let _g = serial();
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let (_p, _) = start_worker(&etcd, &cluster, "prefill", "prefill-a", &[]);
    let (_a, a_addr) = start_worker(&etcd, &cluster, "decode", "decode-a", &["--kv-blocks", "160"]);
    let flags = ["--planner", "--planner-interval-ms", "200", "--rebalance-high", "0.5", "--rebalance-low", "0.3"];
    let (router, addr) = start_router(&etcd, &cluster, &flags);
    for id in ["prefill-a", "decode-a"] {
        router.wait_event("worker joined", &[("worker", id)], Duration::from_secs(30));
    }
    let http = router.addr_after("tandem: router", "http");
    let rt = rt();
    rt.block_on(async {
        let want = stream(&mut client(&addr).await, story_of(480)).await.unwrap();
        let mut runs = Vec::new();
        for _ in 0..4 {
            let addr = addr.clone();
            runs.push(tokio::spawn(async move { stream(&mut client(&addr).await, story_of(480)).await }));
        }
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let s = stats(&a_addr).await;
            if s.running == 4 && s.kv_blocks_used as f64 >= 0.5 * s.kv_blocks_total as f64 {
                break;
            }
            assert!(Instant::now() < end, "decode-a never ran the four stories: {s:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_b, b_addr) = start_worker(&etcd, &cluster, "decode", "decode-b", &[]);
        for (i, r) in runs.into_iter().enumerate() {
            let got = r.await.unwrap().unwrap_or_else(|e| panic!("story {i}: {e:?}"));
            assert_eq!((&got.text, &got.token_ids), (&want.text, &want.token_ids), "story {i}");
        }
        let scrape = http_get(&http, "/metrics");
        let moved = metric(&scrape, "tandem_live_migrations_total", &[("outcome", "moved")]);
        assert!(moved >= 1.0, "the planner moved nothing:\n{scrape}");
        assert!(metric(&scrape, "tandem_planner_decisions_total", &[("action", "rebalance")]) >= 1.0);
        assert_eq!(metric(&scrape, "tandem_migrations_total", &[]), 0.0, "nothing was recomputed");
        assert_idle(&wait_idle(&[a_addr.clone(), b_addr.clone()]).await);
    });
}
