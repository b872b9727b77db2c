//! The OpenAI-compatible HTTP API of `tandem up`, checked with the official `openai`
//! Python client (tests/e2e/openai_client.py) and with curl for the wire format:
//! SSE framing, error bodies and statuses, API keys on HTTP and gRPC.

mod harness;

use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use tonic::Code;

const KEY: &str = "sk-tandem-test";

fn word_after(line: &str, word: &str) -> String {
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == word {
            return it.next().expect("a value after the word").to_string();
        }
    }
    panic!("no {word:?} in {line:?}");
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .expect("curl runs (scripts/setup-python-clients.sh installs it)");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn with_key<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    r
}

#[test]
fn the_openai_client_and_curl_against_tandem_up() {
    let _one = serial();
    let mut cmd = tandem(&["up", "--grpc-port", "0", "--http-port", "0", "--api-key", KEY]);
    cmd.args(["--api-key", "acme:sk-acme-1", "--api-key", "acme:sk-acme-2"]);
    let p = Proc::spawn("tandem up", cmd);
    let line = p.wait_line("tandem: router", Duration::from_secs(60));
    let (grpc, http) = (word_after(&line, "grpc"), word_after(&line, "http"));
    p.wait_line("tandem: ready", Duration::from_secs(60));
    let workers: Vec<String> =
        p.output().iter().filter(|l| l.starts_with("tandem: worker")).map(|l| word_after(l, "grpc")).collect();
    assert_eq!(workers.len(), 2);
    let model = word_after(&line, "model").trim_end_matches([')', ';']).to_string();

    let expected = rt().block_on(async {
        let mut c = client(&grpc).await;
        // gRPC needs the key too; health stays open for probes.
        let e = c.generate(chat("Name three primary colors.", 40)).await.expect_err("no key");
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let r = c.generate(with_key(chat("Name three primary colors.", 40))).await.unwrap().into_inner();
        r.choices[0].text.clone()
    });

    let python = root().join(".venv-clients/bin/python");
    assert!(python.exists(), "run scripts/setup-python-clients.sh (the openai client)");
    let out = Command::new(&python)
        .arg(root().join("tests/e2e/openai_client.py"))
        .args([&http, KEY, &model, &expected])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "openai client checks failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all ok"), "{stdout}");

    // The client that left mid-stream: both workers let go of its blocks.
    rt().block_on(async {
        let end = Instant::now() + Duration::from_secs(10);
        for w in &workers {
            loop {
                let s = stats(w).await;
                if (s.running, s.waiting, s.waiting_for_kv, s.kv_blocks_used) == (0, 0, 0, 0) {
                    break;
                }
                assert!(Instant::now() < end, "worker {w} still holds the abandoned request: {s:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });

    // SSE framing: `data: <json>` events separated by blank lines, ending with `data: [DONE]`.
    let auth = format!("Authorization: Bearer {KEY}");
    let url = format!("http://{http}/v1/chat/completions");
    let body = r#"{"messages":[{"role":"user","content":"Say hi"}],"temperature":0,"max_tokens":6,"stream":true}"#;
    let (sse, err) = curl(&["-N", "-H", &auth, "-H", "Content-Type: application/json", "-d", body, &url]);
    assert!(err.is_empty(), "{err}");
    let events: Vec<&str> = sse.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
    assert!(events.len() >= 3, "{sse:?}");
    for e in &events {
        assert!(e.starts_with("data: ") && !e.contains('\n'), "one data line per event: {e:?}");
    }
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    for e in &events[..events.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(&e["data: ".len()..]).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
    }

    // Error bodies: OpenAI's shape, the right status.
    let status_and_body = |args: &[&str]| {
        let mut a = vec!["-w", "\n%{http_code}"];
        a.extend_from_slice(args);
        let (out, _) = curl(&a);
        let (body, code) = out.rsplit_once('\n').unwrap();
        (code.to_string(), serde_json::from_str::<serde_json::Value>(body).unwrap_or(serde_json::Value::Null))
    };
    let json_ct = "Content-Type: application/json";
    let posted = |body: &'static str| vec!["-H", auth.as_str(), "-H", json_ct, "-d", body, url.as_str()];
    for (args, code, kind) in [
        (posted("{not json"), "400", "invalid_request_error"),
        (vec!["-H", json_ct, "-d", body, url.as_str()], "401", "authentication_error"),
        (posted(r#"{"model":"x","messages":[{"role":"user","content":"a"}]}"#), "404", "invalid_request_error"),
        (posted(r#"{"messages":[{"role":"user","content":"a"}],"max_tokens":0}"#), "400", "invalid_request_error"),
    ] {
        let (got, v) = status_and_body(&args);
        assert_eq!(got, code, "{args:?}: {v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(v["error"].get("param").is_some() && v["error"].get("code").is_some(), "{v}");
    }
    // Tenants: the prefix cache is shared within a tenant, never across, whatever salt a
    // client sends.
    let cached = |key: &str, salt: &str| {
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"Describe a quiet harbor at dawn in detail."}}],"max_tokens":2,"temperature":0,"cache_salt":"{salt}"}}"#
        );
        let (out, _) = curl(&["-H", &format!("Authorization: Bearer {key}"), "-H", json_ct, "-d", &body, &url]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or_else(|| panic!("{v}"))
    };
    assert_eq!(cached(KEY, "s"), 0, "a new prompt");
    assert!(cached(KEY, "s") > 0, "the same tenant and salt hit the cache");
    assert_eq!(cached("sk-acme-1", "s"), 0, "another tenant with the same client salt does not");
    assert!(cached("sk-acme-2", "s") > 0, "a second key of that tenant shares its cache");
    // Probes need no key.
    for (path, want) in [("/health", "ok"), ("/ready", "ready")] {
        let (got, _) = curl(&[&format!("http://{http}{path}")]);
        assert_eq!(got, want, "{path}");
    }
    let (metrics, _) = curl(&[&format!("http://{http}/metrics")]);
    assert!(metrics.contains("tandem_workers{role=\"decode\",state=\"healthy\"} 1"), "{metrics}");
}
