//! Live migration end to end, with real processes, etcd and the real model: running
//! decodes move to another decode worker with their KV (nothing recomputed) when their
//! worker drains (SIGTERM), when an operator asks (`tandem worker migrate`), and the
//! failures on the way leave every request correct and no block held.

mod harness;

use std::time::{Duration, Instant};

use harness::*;
use tandem_proto::tandem::v1 as api;

/// Request `i` of a run: greedy for most, seeded sampling (with penalties) for every fifth;
/// long enough to be running when the move comes.
fn request(i: usize, max_tokens: u32) -> api::GenerateRequest {
    let topics = ["rivers", "mountains", "lanterns", "copper", "gardens", "harbors", "meadows", "orchards"];
    let text = format!("Story {i}: write a long story about {} and the people near them.", topics[i % topics.len()]);
    let mut r = chat(&text, max_tokens);
    let s = r.sampling.as_mut().unwrap();
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
