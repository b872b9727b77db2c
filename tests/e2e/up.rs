//! `tandem up`: router and workers in one process on this machine, reached by a
//! generic gRPC client (reflection, no .proto) and by a typed one; SIGTERM
//! drains the requests in flight and exits 0.

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::*;

fn start_up(extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["up", "--grpc-port", "0", "--http-port", "0"];
    args.extend_from_slice(extra);
    let p = Proc::spawn("tandem up", tandem(&args));
    let addr = p.addr_after("tandem: router", "grpc");
    p.wait_line("tandem: ready", Duration::from_secs(60));
    (p, addr)
}

/// Waits until the router has seen `n` workers join.
fn wait_workers(p: &Proc, n: usize) {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while p.output().iter().filter(|l| is_event(l, "worker joined", &[])).count() < n {
        assert!(std::time::Instant::now() < end, "workers did not join: {:?}", p.output());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Three streams in flight, then SIGTERM: every one finishes, and the process exits 0.
fn sigterm_drains(p: &mut Proc, addr: &str) {
    rt().block_on(async {
        let client = client(addr).await;
        let mut req = chat("Tell me a story about a lighthouse.", 48);
        req.sampling.as_mut().unwrap().ignore_eos = true;
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let (mut cl, req, tx) = (client.clone(), req.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let mut s = cl.generate_stream(req).await?.into_inner();
                let (mut n, mut finish) = (0, 0);
                while let Some(m) = s.message().await? {
                    if n == 0 {
                        let _ = tx.send(()).await;
                    }
                    n += m.token_ids.len();
                    finish = m.finish_reason;
                }
                Ok::<_, tonic::Status>((n, finish))
            }));
        }
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.expect("streams start");
        }
        p.signal("TERM");
        for t in tasks {
            let (n, finish) = t.await.unwrap().expect("a request in flight finishes during the drain");
            assert_eq!((n, finish), (48, tandem_proto::tandem::v1::FinishReason::Length as i32));
        }
    });
    assert_eq!(
        p.wait_exit(Duration::from_secs(60)),
        Some(0),
        "exit code after SIGTERM; output:\n{}",
        p.output().join("\n")
    );
    p.wait_line("tandem: stopped", Duration::from_secs(1));
}

#[test]
fn up_serves_a_generic_grpc_client_and_drains_on_sigterm() {
    let _one = serial();
    let (mut p, addr) = start_up(&[]);
    wait_workers(&p, 2);

    // A client that knows no .proto: services through reflection, health, a streamed call.
    let (ok, out, err) = grpc_call(&[&addr, "list"]);
    assert!(ok, "list: {err}");
    for svc in ["tandem.v1.Generate", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(out.lines().any(|l| l == svc), "{svc} listed: {out}");
    }
    let (ok, out, err) =
        grpc_call(&["-d", r#"{"service":"tandem.v1.Generate"}"#, &addr, "grpc.health.v1.Health/Check"]);
    assert!(ok && out.contains("SERVING"), "health: {out} {err}");
    let prompt = "Name three primary colors.";
    let body = serde_json::json!({
        "messages": {"messages": [{"role": "user", "content": prompt}]},
        "sampling": {"temperature": 0, "max_tokens": 40}
    })
    .to_string();
    let (ok, out, err) = grpc_call(&["-d", &body, &addr, "tandem.v1.Generate/GenerateStream"]);
    assert!(ok, "stream: {err}");
    let chunks: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(chunks.len() > 2, "streamed in pieces: {out}");
    let text: String = chunks.iter().filter_map(|c| c["text"].as_str()).collect();
    assert_eq!(text, generate_reference(Some(prompt), None, 40));
    let last = chunks.last().unwrap();
    assert!(last["finish_reason"].as_str().is_some_and(|f| f.starts_with("FINISH_REASON_")), "{last}");
    assert!(last["usage"]["completion_tokens"].as_u64().is_some(), "usage on the last chunk: {last}");
    // A bad request through the same client: INVALID_ARGUMENT, exit code 1.
    let (ok, _, err) = grpc_call(&["-d", r#"{"prompt":""}"#, &addr, "tandem.v1.Generate/Generate"]);
    assert!(!ok && err.contains("INVALID_ARGUMENT"), "{err}");

    // The load generator drives the same API.
    let out = Command::new(tandem_bin())
        .args(["bench", "serve", "--target", &addr, "--requests", "4", "--concurrency", "2", "--max-tokens", "8"])
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "bench serve: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requests"], 4);
    assert!(v["output_tok_s"].as_f64().unwrap() > 0.0);
    for k in ["ttft_ms", "tpot_ms"] {
        for p in ["mean", "p50", "p90", "p99"] {
            assert!(v[k][p].as_f64().is_some_and(|x| x > 0.0), "{k}.{p} in {v}");
        }
    }
    // Open loop over the OpenAI API, two rates, SLOs and a chart.
    let http = p.output().iter().find(|l| l.starts_with("tandem: router")).and_then(|l| {
        let mut it = l.split_whitespace().skip_while(|w| *w != "http");
        it.nth(1).map(str::to_string)
    });
    let png = std::env::temp_dir().join(format!("tandem-bench-{}.png", std::process::id()));
    let out = Command::new(tandem_bin())
        .args(["bench", "serve", "--api", "openai", "--target", &http.expect("an http address")])
        .args([
            "--rate",
            "4,8",
            "--requests",
            "6",
            "--max-tokens",
            "6",
            "--slo-ttft-ms",
            "10000",
            "--slo-tpot-ms",
            "1000",
        ])
        .args(["--json", "--plot"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(out.status.success(), "bench serve --api openai: {}", String::from_utf8_lossy(&out.stderr));
    let runs: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(runs.len(), 2, "one JSON line per rate");
    for r in &runs {
        assert_eq!((r["requests"].as_u64(), r["failed"].as_u64()), (Some(6), Some(0)), "{r}");
        assert_eq!(r["slo_attainment"].as_f64(), Some(1.0), "generous SLOs are met: {r}");
        assert!(r["goodput_rps"].as_f64().unwrap() > 0.0);
    }
    let img = std::fs::read(&png).expect("the chart is written");
    std::fs::remove_file(&png).ok();
    assert!(img.starts_with(b"\x89PNG") && img.len() > 10_000, "a PNG chart ({} bytes)", img.len());

    sigterm_drains(&mut p, &addr);
}

#[test]
fn aggregated_mode_serves_with_role_both_workers() {
    let _one = serial();
    let (mut p, addr) = start_up(&["--prefill-workers", "0", "--decode-workers", "2"]);
    assert!(p.output().iter().any(|l| l.contains("(both)")), "role both: {:?}", p.output());
    wait_workers(&p, 2);
    rt().block_on(async {
        let mut c = client(&addr).await;
        for prompt in ["Why is the sky blue?", "Say hello in French."] {
            let got = stream(&mut c, chat(prompt, 32)).await.unwrap();
            assert_eq!(got.text, generate_reference(Some(prompt), None, 32), "{prompt}");
        }
        // n = 2 greedy choices: both equal, both in the unary answer.
        let mut req = chat("Say hello in French.", 16);
        req.sampling.as_mut().unwrap().n = Some(2);
        let r = c.generate(req).await.unwrap().into_inner();
        assert_eq!(r.choices.len(), 2);
        assert_eq!(r.choices[0].text, r.choices[1].text);
        let u = r.usage.unwrap();
        assert_eq!(u.completion_tokens as usize, r.choices.iter().map(|c| c.token_ids.len()).sum::<usize>());
    });
    sigterm_drains(&mut p, &addr);
}
