//! The disaggregated cluster as separate processes against a real etcd: a router,
//! prefill and decode workers, all `tandem` binaries, talking gRPC and moving KV
//! over real sockets. Checked with a real gRPC client.

mod harness;

use std::time::{Duration, Instant};

use harness::*;
use tandem_proto::tandem::v1 as api;
use tonic::Code;

async fn settle_idle(addrs: &[String]) -> Vec<api_stats::Stats> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = Vec::new();
        for a in addrs {
            all.push(api_stats::Stats::from(stats(a).await));
        }
        if all.iter().all(|s| s.idle()) || Instant::now() > end {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

mod api_stats {
    /// The parts of a worker's stats that say whether it holds anything.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Stats {
        pub running: u32,
        pub waiting: u32,
        pub waiting_for_kv: u32,
        pub kv_blocks_used: u32,
    }
    impl From<tandem_proto::tandem::worker::v1::StatsResponse> for Stats {
        fn from(s: tandem_proto::tandem::worker::v1::StatsResponse) -> Self {
            Stats {
                running: s.running,
                waiting: s.waiting,
                waiting_for_kv: s.waiting_for_kv,
                kv_blocks_used: s.kv_blocks_used,
            }
        }
    }
    impl Stats {
        pub fn idle(&self) -> bool {
            *self == Stats { running: 0, waiting: 0, waiting_for_kv: 0, kv_blocks_used: 0 }
        }
    }
}

#[test]
fn greedy_text_equals_tandem_generate_and_32_concurrent_streams_complete() {
    let _one = serial();
    let c = Cluster::start(&[("prefill", "prefill-0"), ("decode", "decode-0")]);
    rt().block_on(async {
        let mut client = client(&c.router_addr).await;
        // Through the cluster, the same text as `tandem generate` in one process.
        for p in &PROMPTS[..3] {
            let got = stream(&mut client, chat(p, 48)).await.unwrap();
            assert_eq!(got.text, generate_reference(Some(p), None, 48), "chat {p:?}");
            assert_ne!(got.finish, 0);
            assert!(got.chunks > 1, "the reply streams in pieces");
        }
        let raw_prompt = "The three laws of motion are";
        let got = stream(&mut client, raw(raw_prompt, 32)).await.unwrap();
        assert_eq!(got.text, generate_reference(None, Some(raw_prompt), 32), "raw prompt");

        // Each prompt alone, then 32 streams at once (each prompt four times).
        let mut single = Vec::new();
        for p in PROMPTS {
            single.push(stream(&mut client, chat(p, 24)).await.unwrap());
        }
        let mut tasks = Vec::new();
        for i in 0..32 {
            let mut cl = client.clone();
            tasks.push(tokio::spawn(async move { (i % 8, stream(&mut cl, chat(PROMPTS[i % 8], 24)).await) }));
        }
        for t in tasks {
            let (p, got) = t.await.unwrap();
            let got = got.unwrap_or_else(|e| panic!("stream for prompt {p} failed: {e}"));
            assert_eq!(got.text, single[p].text, "prompt {p} under load");
            assert_eq!(got.token_ids, single[p].token_ids, "prompt {p} under load");
            let u = got.usage.expect("usage on the last chunk");
            assert_eq!(u.completion_tokens as usize, got.token_ids.len());
        }
        // Nothing is left behind on either worker.
        let addrs: Vec<String> = c.workers.iter().map(|(_, a)| a.clone()).collect();
        for (s, a) in settle_idle(&addrs).await.iter().zip(&addrs) {
            assert!(s.idle(), "worker {a} still holds something: {s:?}");
        }
    });
}

/// A request whose prompt field is not valid UTF-8, sent as raw protobuf bytes.
async fn send_invalid_utf8(addr: &str) -> tonic::Status {
    // Field 2 (`prompt`), length-delimited, two bytes that are not UTF-8.
    let status = raw_grpc::call(addr, "/tandem.v1.Generate/Generate", vec![0x12, 0x02, 0xff, 0xfe], false).await;
    assert_ne!(status.code(), tonic::Code::Ok, "invalid UTF-8 is refused");
    status
}

#[test]
fn bad_input_cancel_overload_and_missing_roles_get_their_status() {
    let _one = serial();
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let (prefill, paddr) = start_worker(&etcd, &cluster, "prefill", "prefill-0", &[]);
    let (_decode, daddr) = start_worker(&etcd, &cluster, "decode", "decode-0", &[]);
    let (router, raddr) = start_router(&etcd, &cluster, &["--max-inflight", "3"]);
    router.wait_event("worker joined", &[("worker", "prefill-0")], Duration::from_secs(30));
    router.wait_event("worker joined", &[("worker", "decode-0")], Duration::from_secs(30));
    let mut prefill = prefill;
    rt().block_on(async {
        let mut client = client(&raddr).await;
        let ok = stream(&mut client, chat("Say hello in French.", 8)).await.unwrap();
        assert!(!ok.text.is_empty());

        // Every bad input: INVALID_ARGUMENT naming the field.
        let with = |f: &dyn Fn(&mut api::SamplingParams)| {
            let mut r = chat("Hi", 8);
            f(r.sampling.as_mut().unwrap());
            r
        };
        let long = "word ".repeat(9000);
        let mut unknown_model = chat("Hi", 8);
        unknown_model.model = "gpt-17".into();
        let mut bad_role = chat("Hi", 8);
        if let Some(api::generate_request::Input::Messages(m)) = bad_role.input.as_mut() {
            m.messages[0].role = "robot".into();
        }
        let mut forged_id = chat("Hi", 8);
        forged_id.request_id =
            Some("r1\n2026-12-03T00:00:00Z  INFO tandem_router::members: worker left worker=decode-0\u{1b}[2J".into());
        let cases: Vec<(&str, api::GenerateRequest, &str)> = vec![
            ("empty prompt", raw("", 8), "prompt"),
            ("no input", api::GenerateRequest::default(), "prompt"),
            ("prompt longer than the context", raw(&long, 8), "prompt"),
            ("max_tokens 0", with(&|s| s.max_tokens = Some(0)), "sampling.max_tokens"),
            ("max_tokens above the context", with(&|s| s.max_tokens = Some(100_000)), "sampling.max_tokens"),
            ("negative temperature", with(&|s| s.temperature = Some(-0.5)), "sampling.temperature"),
            ("top_p 0", with(&|s| s.top_p = Some(0.0)), "sampling.top_p"),
            ("top_p above 1", with(&|s| s.top_p = Some(1.5)), "sampling.top_p"),
            ("n above 16", with(&|s| s.n = Some(17)), "sampling.n"),
            ("unknown role", bad_role, "messages[0].role"),
            ("a request_id forging a log line", forged_id, "request_id"),
        ];
        for (what, req, field) in cases {
            let e = stream(&mut client, req.clone()).await.expect_err(what);
            assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
            assert!(e.message().starts_with(field), "{what}: message {:?} names {field}", e.message());
            let e = client.generate(req).await.expect_err(what);
            assert_eq!(e.code(), Code::InvalidArgument, "{what} (unary): {e:?}");
        }
        // A model this router does not serve: NOT_FOUND, naming it.
        let e = stream(&mut client, unknown_model.clone()).await.expect_err("unknown model");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().starts_with("model: unknown model \"gpt-17\""), "{:?}", e.message());
        let e = client.generate(unknown_model).await.expect_err("unknown model (unary)");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let e = send_invalid_utf8(&raddr).await;
        assert_eq!(e.code(), Code::InvalidArgument, "invalid UTF-8: {e:?}");
        // prost names the oneof that holds `prompt`.
        assert!(e.message().contains("GenerateRequest.input"), "names the field: {:?}", e.message());

        // A deadline shorter than the generation: DEADLINE_EXCEEDED, and nothing is left behind.
        let mut long_req = chat("Tell me a very long story about a dragon.", 400);
        long_req.sampling.as_mut().unwrap().ignore_eos = true;
        let mut r = tonic::Request::new(long_req.clone());
        r.set_timeout(Duration::from_millis(700));
        let e = client.generate(r).await.expect_err("the deadline passes first");
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        let idle = settle_idle(&[paddr.clone(), daddr.clone()]).await;
        assert!(idle.iter().all(|s| s.idle()), "blocks freed after the deadline: {idle:?}");

        // Cancel mid-stream: both workers free the request's blocks.
        let mut s = client.generate_stream(long_req.clone()).await.unwrap().into_inner();
        for _ in 0..3 {
            s.message().await.unwrap().expect("a chunk");
        }
        let busy = stats(&daddr).await;
        assert!(busy.kv_blocks_used > 0 && busy.running == 1, "the decode worker holds the request: {busy:?}");
        drop(s);
        let idle = settle_idle(&[paddr.clone(), daddr.clone()]).await;
        assert!(idle.iter().all(|s| s.idle()), "blocks freed on both workers after the cancel: {idle:?}");

        // Overload: the router holds three requests; a fourth is refused at once.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut s = client.generate_stream(long_req.clone()).await.unwrap().into_inner();
            s.message().await.unwrap().expect("a chunk");
            held.push(s);
        }
        let e = stream(&mut client, chat("Hi", 4)).await.expect_err("over the in-flight limit");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert_eq!(e.metadata().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"), "{e:?}");
        // ...and the held ones were not disturbed.
        for s in held.iter_mut() {
            s.message().await.unwrap().expect("still streaming");
        }
        drop(held);
        let idle = settle_idle(&[paddr.clone(), daddr.clone()]).await;
        assert!(idle.iter().all(|s| s.idle()), "{idle:?}");
        // Requests are served again once the held ones are gone.
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match stream(&mut client, chat("Say hello in French.", 8)).await {
                Ok(again) => {
                    assert_eq!(again.text, ok.text);
                    break;
                }
                Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < end => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("after the overload: {e:?}"),
            }
        }

        // No prefill worker (and the decode worker is not role `both`): UNAVAILABLE.
        prefill.kill();
        router.wait_event("worker left", &[("worker", "prefill-0")], Duration::from_secs(15));
        let e = stream(&mut client, chat("Hi", 4)).await.expect_err("no prefill worker");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    });
}

#[test]
fn a_killed_decode_worker_leaves_within_its_ttl_and_without_migration_its_requests_fail_cleanly() {
    let _one = serial();
    let workers = [("prefill", "prefill-0"), ("decode", "decode-a"), ("decode", "decode-b")];
    let mut c = Cluster::start_with(&workers, &["--migration-limit", "0"]);
    rt().block_on(async {
        let client = client(&c.router_addr).await;
        let mut long_req = chat("Tell me a very long story about a dragon.", 300);
        long_req.sampling.as_mut().unwrap().ignore_eos = true;
        let (started_tx, mut started_rx) = tokio::sync::mpsc::channel(16);
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let (mut cl, req, tx) = (client.clone(), long_req.clone(), started_tx.clone());
            tasks.push(tokio::spawn(async move {
                let mut s = cl.generate_stream(req).await?.into_inner();
                let mut n = 0;
                while let Some(m) = s.message().await? {
                    n += m.token_ids.len();
                    if n == m.token_ids.len() {
                        let _ = tx.send(()).await;
                    }
                    if m.finish_reason != 0 {
                        return Ok(n);
                    }
                }
                Ok::<usize, tonic::Status>(n)
            }));
        }
        for _ in 0..6 {
            tokio::time::timeout(Duration::from_secs(60), started_rx.recv()).await.expect("every stream starts");
        }
        let b = c.workers.iter_mut().find(|(p, _)| p.name == "decode-b").unwrap();
        let killed = Instant::now();
        b.0.kill();
        let (mut done, mut failed) = (0, 0);
        for t in tasks {
            match tokio::time::timeout(Duration::from_secs(60), t).await.expect("no stream hangs").unwrap() {
                Ok(n) => {
                    assert_eq!(n, 300, "a surviving stream completes");
                    done += 1;
                }
                Err(e) => {
                    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                    assert!(e.message().contains("decode-b"), "the error names the worker: {e:?}");
                    failed += 1;
                }
            }
        }
        assert!(done >= 1 && failed >= 1, "streams were spread over both decode workers: {done} done, {failed} failed");
        let gone_after =
            c.router.event_time("worker left", &[("worker", "decode-b")], Duration::from_secs(10)) - killed;
        // A 2 s lease; etcd checks expiry every half second or so.
        assert!(gone_after < Duration::from_secs(5), "left the view after {gone_after:?}");
        let mut cl = client.clone();
        for p in &PROMPTS[..4] {
            stream(&mut cl, chat(p, 8)).await.expect("the survivors serve");
        }
        let addrs: Vec<String> =
            c.workers.iter().filter(|(p, _)| p.name != "decode-b").map(|(_, a)| a.clone()).collect();
        let idle = settle_idle(&addrs).await;
        assert!(idle.iter().all(|s| s.idle()), "{idle:?}");
    });
}

#[test]
fn an_etcd_outage_keeps_the_cluster_serving_and_membership_resumes_after() {
    let _one = serial();
    let mut c = Cluster::start(&[("prefill", "prefill-0"), ("decode", "decode-a"), ("decode", "decode-b")]);
    rt().block_on(async {
        let mut client = client(&c.router_addr).await;
        let want = stream(&mut client, chat(PROMPTS[0], 16)).await.unwrap();
        c.etcd.stop();
        // Longer than the 2 s lease: nobody is evicted while etcd cannot speak.
        tokio::time::sleep(Duration::from_secs(4)).await;
        for _ in 0..4 {
            let got = stream(&mut client, chat(PROMPTS[0], 16)).await.expect("served on the last view");
            assert_eq!(got.text, want.text);
        }
        let left = |l: &String| is_event(l, "worker left", &[]);
        assert!(!c.router.output().iter().any(left), "no worker left: {:?}", c.router.output());
        c.etcd.restart();
        // The watch resumes: a worker killed now leaves the view.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let b = c.workers.iter_mut().find(|(p, _)| p.name == "decode-b").unwrap();
        b.0.kill();
        c.router.wait_event("worker left", &[("worker", "decode-b")], Duration::from_secs(20));
        let gone = |w: &str| c.router.output().iter().any(|l| is_event(l, "worker left", &[("worker", w)]));
        assert!(!gone("decode-a") && !gone("prefill-0"), "the others stayed: {:?}", c.router.output());
        for p in &PROMPTS[..2] {
            stream(&mut client, chat(p, 8)).await.expect("the survivors serve");
        }
    });
}

/// Streams every request at once; `started` hears of each stream's first token.
async fn stream_all(
    client: &tandem_proto::tandem::v1::generate_client::GenerateClient<tonic::transport::Channel>,
    reqs: &[api::GenerateRequest],
    started: Option<tokio::sync::mpsc::Sender<()>>,
) -> Vec<Result<Streamed, tonic::Status>> {
    let mut tasks = Vec::new();
    for r in reqs {
        let (mut cl, r, started) = (client.clone(), r.clone(), started.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = cl.generate_stream(r).await?.into_inner();
            let mut out = Streamed::default();
            while let Some(m) = s.message().await? {
                if out.token_ids.is_empty() && !m.token_ids.is_empty() {
                    if let Some(tx) = &started {
                        let _ = tx.send(()).await;
                    }
                }
                out.text.push_str(&m.text);
                out.token_ids.extend(m.token_ids);
                out.chunks += 1;
                if m.finish_reason != 0 {
                    out.finish = m.finish_reason;
                }
            }
            Ok(out)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(tokio::time::timeout(Duration::from_secs(180), t).await.expect("no stream hangs").unwrap());
    }
    out
}

#[test]
fn a_decode_worker_killed_mid_stream_loses_no_request_and_changes_no_byte() {
    let _one = serial();
    let mut c = Cluster::start(&[("prefill", "prefill-0"), ("decode", "decode-a"), ("decode", "decode-b")]);
    rt().block_on(async {
        let client = client(&c.router_addr).await;
        let reqs: Vec<api::GenerateRequest> = (0..64)
            .map(|i| {
                let mut r = chat(PROMPTS[i % 8], 64);
                r.sampling.as_mut().unwrap().ignore_eos = true;
                r
            })
            .collect();
        // The undisturbed run.
        let want: Vec<Streamed> = stream_all(&client, &reqs, None).await.into_iter().map(|r| r.unwrap()).collect();
        // Again, killing a decode worker while it decodes several of the streams.
        let run = {
            let (client, reqs) = (client.clone(), reqs.clone());
            tokio::spawn(async move { stream_all(&client, &reqs, None).await })
        };
        let b = c.workers.iter().position(|(p, _)| p.name == "decode-b").unwrap();
        let end = Instant::now() + Duration::from_secs(120);
        while stats(&c.workers[b].1).await.running < 4 {
            assert!(Instant::now() < end, "decode-b never ran 4 streams at once");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c.workers[b].0.kill();
        let got = run.await.unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let g = g.as_ref().unwrap_or_else(|e| panic!("stream {i} was lost: {e:?}"));
            assert_eq!(
                (&g.text, &g.token_ids),
                (&w.text, &w.token_ids),
                "stream {i}: byte-identical to the undisturbed run"
            );
            assert_eq!(g.finish, w.finish);
        }
        let moved = c.router.output().iter().filter(|l| l.contains("migrating to another worker")).count();
        assert!(moved > 0, "some streams were on the killed worker and moved: {:?}", c.router.output());
        let survivors: Vec<String> =
            c.workers.iter().filter(|(p, _)| p.name != "decode-b").map(|(_, a)| a.clone()).collect();
        let idle = settle_idle(&survivors).await;
        assert!(idle.iter().all(|s| s.idle()), "{idle:?}");
    });
}

/// Constrained streams (JSON Schema, regex, choices; greedy and seeded sampling) through
/// the disaggregated path: the prefill worker samples the first token under the guide and
/// the decode worker goes on from it. A decode worker SIGKILLed mid-stream: the moved
/// streams replay their tokens into a fresh matcher elsewhere, and every stream is
/// byte-identical to its undisturbed run and still matches its guide.
#[test]
fn constrained_streams_survive_a_decode_worker_killed_mid_stream_unchanged_and_valid() {
    use api::guide::Kind;
    let _one = serial();
    let mut c = Cluster::start(&[("prefill", "prefill-0"), ("decode", "decode-a"), ("decode", "decode-b")]);
    let schema = r#"{"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue", "yellow"]}, "maxItems": 4}, "count": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "colors", "count"], "additionalProperties": false}"#;
    let guides = [
        Kind::JsonSchema(schema.into()),
        Kind::Regex("[A-Z][a-z]{2,12}( [a-z]{1,10}){2,5}\\.".into()),
        Kind::Choice(api::Choices { choices: vec!["red".into(), "green".into(), "blue".into()] }),
    ];
    rt().block_on(async {
        let client = client(&c.router_addr).await;
        let reqs: Vec<api::GenerateRequest> = (0..24)
            .map(|i| {
                let mut r = chat(PROMPTS[i % 8], 48);
                let s = r.sampling.as_mut().unwrap();
                s.guide = Some(api::Guide { kind: Some(guides[i % 3].clone()) });
                if i % 2 == 1 {
                    (s.temperature, s.seed) = (Some(0.8), Some(i as u64));
                }
                r
            })
            .collect();
        let want: Vec<Streamed> = stream_all(&client, &reqs, None).await.into_iter().map(|r| r.unwrap()).collect();
        for (i, w) in want.iter().enumerate() {
            match &guides[i % 3] {
                Kind::JsonSchema(_) => {
                    let v: serde_json::Value =
                        serde_json::from_str(&w.text).unwrap_or_else(|e| panic!("{i}: {e}: {:?}", w.text));
                    assert!(v["count"].is_u64() && v["colors"].is_array() && v["name"].is_string(), "{i}: {v}");
                }
                Kind::Choice(c) => assert!(c.choices.contains(&w.text), "{i}: {:?}", w.text),
                _ => assert!(
                    w.text.ends_with('.') && w.text.chars().next().unwrap().is_ascii_uppercase(),
                    "{i}: {:?}",
                    w.text
                ),
            }
        }
        let run = {
            let (client, reqs) = (client.clone(), reqs.clone());
            tokio::spawn(async move { stream_all(&client, &reqs, None).await })
        };
        let b = c.workers.iter().position(|(p, _)| p.name == "decode-b").unwrap();
        let end = Instant::now() + Duration::from_secs(120);
        while stats(&c.workers[b].1).await.running < 2 {
            assert!(Instant::now() < end, "decode-b never ran 2 streams at once");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.workers[b].0.kill();
        let got = run.await.unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let g = g.as_ref().unwrap_or_else(|e| panic!("stream {i} was lost: {e:?}"));
            assert_eq!((&g.text, &g.token_ids), (&w.text, &w.token_ids), "stream {i}: as undisturbed");
        }
        let moved = c.router.output().iter().filter(|l| l.contains("migrating to another worker")).count();
        assert!(moved > 0, "some constrained streams were on the killed worker and moved: {:?}", c.router.output());
        let survivors: Vec<String> =
            c.workers.iter().filter(|(p, _)| p.name != "decode-b").map(|(_, a)| a.clone()).collect();
        let idle = settle_idle(&survivors).await;
        assert!(idle.iter().all(|s| s.idle()), "{idle:?}");
    });
}

/// Requests abandoned at random moments — queued, prefilling, transferring, decoding —
/// leave no block behind on any worker.
#[test]
fn an_abort_storm_leaves_every_worker_as_it_was() {
    let _one = serial();
    let c = Cluster::start(&[("prefill", "prefill-0"), ("decode", "decode-0")]);
    rt().block_on(async {
        let client = client(&c.router_addr).await;
        let addrs: Vec<String> = c.workers.iter().map(|(_, a)| a.clone()).collect();
        let before = settle_idle(&addrs).await;
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        let mut tasks = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for i in 0..400usize {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Abort after 0–600 ms: before routing, during prefill or transfer, or mid-decode.
            let after = Duration::from_millis(seed % 600);
            let mut req = chat(PROMPTS[i % 8], 64);
            req.sampling.as_mut().unwrap().ignore_eos = true;
            let (mut cl, permit) = (client.clone(), sem.clone().acquire_owned().await.unwrap());
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                let _ = tokio::time::timeout(after, async {
                    let mut s = cl.generate_stream(req).await?.into_inner();
                    while s.message().await?.is_some() {}
                    Ok::<(), tonic::Status>(())
                })
                .await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let after = settle_idle(&addrs).await;
        assert!(after.iter().all(|s| s.idle()), "every block came back: before {before:?}, after {after:?}");
        // And the cluster still serves.
        let mut cl = client.clone();
        stream(&mut cl, chat(PROMPTS[0], 8)).await.expect("served after the storm");
    });
}

/// A router killed mid-stream leaves no orphan on the workers (each request's stream or
/// call to them breaks, and they abort it), and a new router finds the workers in etcd and
/// serves at once.
#[test]
fn a_killed_router_leaves_no_orphans_and_a_new_one_serves_at_once() {
    let _one = serial();
    let mut c = Cluster::start(&[("prefill", "prefill-0"), ("decode", "decode-0")]);
    rt().block_on(async {
        let client = client(&c.router_addr).await;
        let addrs: Vec<String> = c.workers.iter().map(|(_, a)| a.clone()).collect();
        let mut req = chat(PROMPTS[0], 400);
        req.sampling.as_mut().unwrap().ignore_eos = true;
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut s = client.clone().generate_stream(req.clone()).await.unwrap().into_inner();
            s.message().await.unwrap().expect("a chunk");
            held.push(s);
        }
        assert!(stats(&addrs[1]).await.running > 0, "the decode worker is busy");
        c.router.kill();
        let killed = Instant::now();
        let idle = settle_idle(&addrs).await;
        assert!(idle.iter().all(|s| s.idle()), "orphans aborted within {:?}: {idle:?}", killed.elapsed());
        for s in held.iter_mut() {
            // Chunks already in the client's buffers come first; then the stream breaks.
            let ended = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match s.message().await {
                        Ok(Some(m)) => assert_eq!(m.finish_reason, 0, "a 400-token stream cannot have finished"),
                        Ok(None) | Err(_) => return,
                    }
                }
            })
            .await;
            assert!(ended.is_ok(), "the client's stream ends instead of hanging");
        }
        let (router, addr) = start_router(&c.etcd, &c.cluster, &[]);
        let started = Instant::now();
        for id in ["prefill-0", "decode-0"] {
            router.wait_event("worker joined", &[("worker", id)], Duration::from_secs(10));
        }
        let mut fresh = harness::client(&addr).await;
        let got = stream(&mut fresh, chat(PROMPTS[1], 8)).await.expect("the new router serves");
        assert!(!got.text.is_empty());
        assert!(started.elapsed() < Duration::from_secs(10), "served after {:?}", started.elapsed());
        drop(router);
    });
}
