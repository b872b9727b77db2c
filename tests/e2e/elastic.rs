//! Elastic prefill/decode end to end, with real processes, etcd and the real model:
//! a decode worker's role changed under 32 streams (`tandem worker set-role`), the
//! router's per-request placement read from its `/metrics`, and the planner flipping a
//! worker as the load shifts.

mod harness;

use std::time::{Duration, Instant};

use harness::*;
use tandem_proto::tandem::worker::v1 as pb;

/// `tandem worker set-role` against `addr`, as an operator runs it; its output.
fn set_role(addr: &str, role: &str) -> String {
    let out = tandem_serving(&["worker", "set-role", "--worker", addr, "--role", role, "--deadline-s", "120"], &[])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "set-role failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The roles under which etcd lists worker `id` in `cluster`.
fn roles_in_etcd(etcd: &Etcd, cluster: &str, id: &str) -> Vec<String> {
    let prefix = format!("/tandem/{cluster}/workers/");
    etcd.keys(&prefix)
        .into_iter()
        .filter_map(|(k, _)| {
            let rest = k.strip_prefix(&prefix)?;
            let (role, who) = rest.split_once('/')?;
            (who == id).then(|| role.to_string())
        })
        .collect()
}

/// Prompts different enough that no two share a cached block.
fn question(i: usize) -> String {
    let topics = ["rivers", "mountains", "lanterns", "copper", "gardens", "harbors", "meadows", "orchards"];
    format!("Question {i}: tell me one short fact about {} and why it matters.", topics[i % topics.len()])
}

#[test]
fn a_decode_worker_flipped_to_prefill_under_32_streams_loses_nothing() {
    let _g = serial();
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let (_p, _) = start_worker(&etcd, &cluster, "prefill", "prefill-a", &[]);
    let (_da, da_addr) = start_worker(&etcd, &cluster, "decode", "decode-a", &["--elastic"]);
    let (_db, db_addr) = start_worker(&etcd, &cluster, "decode", "decode-b", &[]);
    let (router, addr) = start_router(&etcd, &cluster, &["--policy", "least-loaded"]);
    for id in ["prefill-a", "decode-a", "decode-b"] {
        router.wait_event("worker joined", &[("worker", id)], Duration::from_secs(30));
    }
    let rt = rt();
    rt.block_on(async {
        // The undisturbed run.
        let run = |n: usize| {
            let addr = addr.clone();
            async move {
                let mut tasks = Vec::new();
                for i in 0..n {
                    let addr = addr.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut c = client(&addr).await;
                        stream(&mut c, chat(&question(i), 40)).await
                    }));
                }
                tasks
            }
        };
        let mut want = Vec::new();
        for t in run(32).await {
            want.push(t.await.unwrap().unwrap_or_else(|e| panic!("undisturbed: {e:?}")).text);
        }
        // Again, and decode-a becomes a prefill worker while its streams run.
        let tasks = run(32).await;
        let end = Instant::now() + Duration::from_secs(60);
        while stats(&da_addr).await.running == 0 {
            assert!(Instant::now() < end, "decode-a never ran a stream");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let a = da_addr.clone();
        let flip = tokio::task::spawn_blocking(move || set_role(&a, "prefill"));
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap().unwrap_or_else(|e| panic!("a stream failed across the role change: {e:?}")).text);
        }
        let said = flip.await.unwrap();
        assert!(said.contains("decode -> prefill"), "{said}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "stream {i} differs from the undisturbed run");
        }
        // Its streams moved to decode-b with their KV: nothing was recomputed.
        let scrape = http_get(&router.addr_after("tandem: router", "http"), "/metrics");
        assert!(metric(&scrape, "tandem_live_migrations_total", &[("outcome", "moved")]) >= 1.0, "{scrape}");
        assert_eq!(metric(&scrape, "tandem_migrations_total", &[]), 0.0, "{scrape}");
        // In etcd under its new role only, and serving it.
        assert_eq!(roles_in_etcd(&etcd, &cluster, "decode-a"), ["prefill"]);
        let s = stats(&da_addr).await;
        assert_eq!((s.role, s.elastic, s.changing_role), (pb::WorkerRole::Prefill as i32, true, false));
        let mut wc = worker_client(&da_addr).await;
        let refused = wc.reserve(pb::ReserveRequest { request_id: 7, ..Default::default() }).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
        // The router has it as a prefill worker: new prompts are prefilled there too.
        router.wait_event("worker joined", &[("worker", "decode-a"), ("role", "prefill")], Duration::from_secs(30));
        let before = stats(&da_addr).await.prefix_cache_queried_tokens;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = client(&addr).await;
                let long = format!("{} {}", question(100 + i), "Explain it in detail, step by step. ".repeat(30));
                stream(&mut c, chat(&long, 4)).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap_or_else(|e| panic!("after the change: {e:?}"));
        }
        let after = stats(&da_addr).await.prefix_cache_queried_tokens;
        assert!(after > before, "no prompt was prefilled on the flipped worker ({before} -> {after})");
        // The same role again changes nothing.
        assert_eq!(set_role(&da_addr, "prefill").trim_end(), format!("worker {da_addr} is already prefill"));
    });
    // A worker not started elastic keeps its role.
    let out = tandem_serving(&["worker", "set-role", "--worker", &db_addr, "--role", "prefill"], &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not started with --elastic"), "{err}");
    // And a caller without the cluster token is refused.
    rt.block_on(async {
        let mut stranger = worker_client_with(&da_addr, None).await;
        let req = pb::SetRoleRequest { role: pb::WorkerRole::Decode as i32, deadline_ms: None };
        let e = stranger.set_role(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    });
    assert_eq!(roles_in_etcd(&etcd, &cluster, "decode-a"), ["prefill"]);
}

/// Words for long prompts: common ones, so that most are one token.
const WORDS: [&str; 24] = [
    "river", "mountain", "lantern", "copper", "garden", "whisper", "harbor", "meadow", "signal", "orchard", "window",
    "forest", "silver", "engine", "candle", "valley", "bridge", "pocket", "winter", "summer", "market", "letter",
    "ladder", "island",
];

/// A prompt of about `n` words, `seed` first so that no two share a block.
fn long_prompt(seed: usize, n: usize) -> String {
    let body: Vec<&str> = (0..n).map(|i| WORDS[(i * 7 + seed * 13 + i / 5) % WORDS.len()]).collect();
    format!("Document {seed}. {}. Summarize the document in one sentence.", body.join(" "))
}

#[test]
fn short_prompts_are_prefilled_on_the_decode_worker_and_long_ones_on_the_prefill_worker() {
    let _g = serial();
    // TTFT and TPOT objectives far out of reach of this test's load: the budget stays at its
    // start (256 uncached tokens) and nothing is placed for queueing or TPOT.
    let flags = ["--prefill-placement", "adaptive", "--slo-ttft-ms", "600000", "--slo-tpot-ms", "60000"];
    let c = Cluster::start_with(&[("prefill", "prefill-a"), ("both", "decode-a")], &flags);
    let http = c.router.addr_after("tandem: router", "http");
    let (p_addr, d_addr) = (c.workers[0].1.clone(), c.workers[1].1.clone());
    let rt = rt();
    rt.block_on(async {
        let mut client = client(&c.router_addr).await;
        let queried = || async { stats(&p_addr).await.prefix_cache_queried_tokens };
        let mut short_texts = Vec::new();
        let p0 = queried().await;
        for i in 0..3 {
            let got = stream(&mut client, chat(&question(i), 8)).await.unwrap();
            assert!(got.usage.unwrap().prompt_tokens < 100);
            short_texts.push(got.text);
        }
        assert_eq!(queried().await, p0, "a short prompt reached the prefill worker");
        let d0 = stats(&d_addr).await.prefix_cache_queried_tokens;
        for i in 0..3 {
            let got = stream(&mut client, raw(&long_prompt(i, 500), 4)).await.unwrap();
            assert!(got.usage.unwrap().prompt_tokens > 400, "{:?}", got.usage);
        }
        assert!(queried().await > p0, "no long prompt reached the prefill worker");
        let scrape = http_get(&http, "/metrics");
        let name = "tandem_router_prefill_placement_total";
        assert_eq!(metric(&scrape, name, &[("placement", "local"), ("reason", "short")]), 3.0, "{scrape}");
        assert_eq!(metric(&scrape, name, &[("placement", "remote"), ("reason", "long")]), 3.0, "{scrape}");
        assert_eq!(metric(&scrape, "tandem_router_local_prefill_budget_tokens", &[]), 256.0);
        // The decode worker looked up the long prompts' reservations, never computed them:
        // what it queried grew by the reservations' lookups only, and the short prompts' texts
        // are the model's own.
        assert!(stats(&d_addr).await.prefix_cache_queried_tokens >= d0);
        assert_eq!(short_texts[0], generate_reference(Some(&question(0)), None, 8));
    });
}

#[test]
fn the_planner_flips_a_worker_as_the_load_shifts_at_most_once_per_dwell() {
    let _g = serial();
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let (_p, _) = start_worker(&etcd, &cluster, "prefill", "worker-a", &["--elastic"]);
    let (_d, _) = start_worker(&etcd, &cluster, "decode", "worker-b", &["--role", "both", "--elastic"]);
    let dwell = Duration::from_secs(6);
    // A TPOT objective this machine misses: long prompts count as stalling the decodes.
    let flags = ["--planner", "--planner-dwell-s", "6", "--planner-interval-ms", "200", "--slo-tpot-ms", "2"];
    let (router, addr) = start_router(&etcd, &cluster, &flags);
    for id in ["worker-a", "worker-b"] {
        router.wait_event("worker joined", &[("worker", id)], Duration::from_secs(30));
    }
    let http = router.addr_after("tandem: router", "http");
    let flips = |r: &Proc| r.output().iter().filter(|l| is_event(l, "planner: changing a worker's role", &[])).count();
    let rt = rt();
    rt.block_on(async {
        let mut c = client(&addr).await;
        // Short prompts: the prefill worker is wanted for decoding.
        let mut i = 0;
        let end = Instant::now() + Duration::from_secs(60);
        while !roles_in_etcd(&etcd, &cluster, "worker-a").contains(&"both".to_string()) {
            assert!(Instant::now() < end, "the planner never flipped worker-a:\n{}", router.output().join("\n"));
            stream(&mut c, chat(&question(i), 4)).await.unwrap_or_else(|e| panic!("short {i}: {e:?}"));
            i += 1;
        }
        let first = router.event_time(
            "planner: changing a worker's role",
            &[("worker", "worker-a"), ("to", "both")],
            Duration::from_secs(1),
        );
        // Long prompts now: one worker is wanted back for prefill, but not before the dwell.
        // Four clients send them at once, so the planner's 10 s window holds enough prompts
        // to judge even where a 400-token prefill takes seconds (a CPU without AVX-512).
        let end = Instant::now() + Duration::from_secs(120);
        let mut n = 0;
        let mut lanes = tokio::task::JoinSet::new();
        while flips(&router) < 2 {
            assert!(Instant::now() < end, "the planner never split the workers again:\n{}", router.output().join("\n"));
            while lanes.len() < 4 {
                let (mut c, req) = (c.clone(), raw(&long_prompt(n, 400), 8));
                lanes.spawn(async move { (n, stream(&mut c, req).await) });
                n += 1;
            }
            if let Ok(Some(done)) = tokio::time::timeout(Duration::from_millis(200), lanes.join_next()).await {
                let (k, r) = done.expect("a lane");
                r.unwrap_or_else(|e| panic!("long {k}: {e:?}"));
            }
        }
        while let Some(done) = lanes.join_next().await {
            let (k, r) = done.expect("a lane");
            r.unwrap_or_else(|e| panic!("long {k}: {e:?}"));
        }
        let second =
            router.event_time("planner: changing a worker's role", &[("to", "prefill")], Duration::from_secs(1));
        assert!(second.duration_since(first) >= dwell, "two changes {:?} apart, dwell {dwell:?}", second - first);
        let scrape = http_get(&http, "/metrics");
        assert_eq!(metric(&scrape, "tandem_planner_desired_workers", &[("role", "prefill")]), 1.0, "{scrape}");
        assert!(metric(&scrape, "tandem_planner_decisions_total", &[("action", "to_prefill")]) == 1.0, "{scrape}");
        // Keep the long load for another dwell: no third change.
        let end = Instant::now() + dwell;
        while Instant::now() < end {
            stream(&mut c, raw(&long_prompt(n, 400), 8)).await.unwrap();
            n += 1;
        }
        assert_eq!(flips(&router), 2, "{}", router.output().join("\n"));
    });
}

#[test]
fn tandem_up_with_the_planner_starts_elastic_workers_and_flips_the_idle_prefill_worker() {
    let _g = serial();
    let flags = ["up", "--grpc-port", "0", "--http-port", "0", "--planner", "--planner-dwell-s", "2"];
    let up = Proc::spawn("up", tandem(&[&flags[..], &["--planner-interval-ms", "200"]].concat()));
    let prefill = up.addr_after("tandem: worker prefill-0 (prefill, elastic)", "grpc");
    let decode = up.addr_after("tandem: worker decode-0 (both, elastic)", "grpc");
    let addr = up.addr_after("tandem: router", "grpc");
    up.wait_line("tandem: ready", Duration::from_secs(60));
    let rt = rt();
    rt.block_on(async {
        assert!(stats(&prefill).await.elastic && stats(&decode).await.elastic);
        let mut c = client(&addr).await;
        let end = Instant::now() + Duration::from_secs(60);
        let mut i = 0;
        // Short prompts only: the planner wants the prefill worker's core for decoding.
        while stats(&prefill).await.role != pb::WorkerRole::Both as i32 {
            assert!(Instant::now() < end, "prefill-0 never became both:\n{}", up.output().join("\n"));
            stream(&mut c, chat(&question(i), 4)).await.unwrap_or_else(|e| panic!("request {i}: {e:?}"));
            i += 1;
        }
        // Both workers serve whole requests now.
        for j in 0..4 {
            stream(&mut c, chat(&question(50 + j), 4)).await.unwrap();
        }
    });
}
