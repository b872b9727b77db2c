//! Per-tenant limits and stalled readers (issue 15, item 7), against real processes: a
//! router, a prefill and a decode worker on etcd, driven over real TCP by gRPC and HTTP
//! clients.
//!
//! - One tenant holds its limit of long generations: its next requests are refused
//!   (RESOURCE_EXHAUSTED with `retry-after`, HTTP 429 with `Retry-After` and a body naming
//!   only its own limit) while another tenant is served the same greedy text as alone; the
//!   slot comes back on every path (finish, deadline, cancel, disconnect), exactly once.
//! - Eight clients open streams and never read them (`--max-inflight 8`): gRPC clients with
//!   a 1-byte HTTP/2 window, HTTP/1.1 clients with a tiny socket receive buffer. They hold
//!   every slot until the stall timeout; then their requests are cancelled on the workers,
//!   counted and logged once each, and a normal client is served while they stay connected.
//!
//! Afterwards the workers hold no KV block and nothing runs. Timings are printed, never
//! asserted.

mod harness;
mod hostile;

use std::time::{Duration, Instant};

use harness::*;
use hostile::*;
use serde_json::{json, Value};
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::v1::generate_client::GenerateClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;

/// A prompt whose greedy answer does not end soon (with `ignore_eos`, it never ends early).
const LONG: &str = "Count from one to one thousand, one number per line.";

/// Long enough that a generation outlives every check made while it runs (the prompt and
/// this fit the context of 8,192 tokens).
const LONG_TOKENS: u32 = 6000;

/// A router (with `router_flags`), a prefill worker and a decode worker with KV room for
/// every long generation these tests run, on their own etcd.
struct Setup {
    _etcd: Etcd,
    router: Proc,
    grpc: String,
    http: String,
    workers: Vec<(Proc, String)>,
}

impl Setup {
    fn start(router_flags: &[&str]) -> Setup {
        let etcd = Etcd::start();
        let cluster = format!("e2e{}", free_port());
        let prefill = start_worker(&etcd, &cluster, "prefill", "prefill-0", &[]);
        let decode = start_worker(&etcd, &cluster, "decode", "decode-0", &["--kv-blocks", "2048", "--threads", "2"]);
        let (router, grpc) = start_router(&etcd, &cluster, router_flags);
        for id in ["prefill-0", "decode-0"] {
            router.wait_event("worker joined", &[("worker", id)], Duration::from_secs(30));
        }
        let http = router.addr_after("tandem: router", "http");
        Setup { _etcd: etcd, router, grpc, http, workers: vec![prefill, decode] }
    }

    fn base(&self) -> String {
        format!("http://{}", self.http)
    }

    fn worker_addrs(&self) -> Vec<String> {
        self.workers.iter().map(|(_, a)| a.clone()).collect()
    }

    fn no_panics(&self) {
        no_panics(&std::iter::once(&self.router).chain(self.workers.iter().map(|(p, _)| p)).collect::<Vec<_>>());
    }
}

/// `req` with `authorization: Bearer key`.
fn authed<T>(req: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(req);
    r.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// A greedy chat request of `max_tokens` that does not stop at end-of-sequence.
fn endless(max_tokens: u32) -> api::GenerateRequest {
    let mut r = chat(LONG, max_tokens);
    r.sampling.as_mut().unwrap().ignore_eos = true;
    r
}

/// The value of the sample `series` (name and labels, as rendered) in a Prometheus text body.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The router's `/metrics`.
async fn metrics(web: &reqwest::Client, base: &str) -> String {
    web.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// Polls the router's metrics until `done` holds of them; panics, naming `what`, after `within`.
async fn wait_metrics(web: &reqwest::Client, base: &str, what: &str, within: Duration, done: impl Fn(&str) -> bool) {
    let end = Instant::now() + within;
    loop {
        let m = metrics(web, base).await;
        if done(&m) {
            return;
        }
        let shown: Vec<&str> = m.lines().filter(|l| l.starts_with("tandem_") && !l.contains("_bucket")).collect();
        assert!(Instant::now() < end, "{what}: not within {within:?}; metrics:\n{}", shown.join("\n"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Streams a chat completion with `key`; the text, or the status and body of a refusal.
async fn http_chat(
    web: &reqwest::Client,
    base: &str,
    key: &str,
    body: Value,
) -> Result<String, (u16, Option<String>, Value)> {
    let r = web.post(format!("{base}/v1/chat/completions")).bearer_auth(key).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    if status != 200 {
        let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        return Err((status, retry, r.json().await.unwrap_or(Value::Null)));
    }
    let v: Value = r.json().await.unwrap();
    Ok(v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string())
}

fn greedy(prompt: &str, max_tokens: u32) -> Value {
    json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0})
}

/// A request held in flight by a client that reads it (a background task); aborting the
/// task drops the stream or response: a cancel (gRPC) or a disconnect (HTTP).
struct Held(tokio::task::JoinHandle<()>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens a long gRPC stream as `key` and reads it in the background. `Err` if refused.
async fn hold_grpc(client: &mut GenerateClient<Channel>, key: &str) -> Result<Held, tonic::Status> {
    let mut s = client.generate_stream(authed(endless(LONG_TOKENS), key)).await?.into_inner();
    Ok(Held(tokio::spawn(async move { while let Ok(Some(_)) = s.message().await {} })))
}

/// Opens a long HTTP stream as `key` and reads it in the background. `Err` if refused.
async fn hold_http(web: &reqwest::Client, base: &str, key: &str) -> Result<Held, (u16, Option<String>, Value)> {
    let mut body = greedy(LONG, LONG_TOKENS);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let mut r = web.post(format!("{base}/v1/chat/completions")).bearer_auth(key).json(&body).send().await.unwrap();
    if r.status() != 200 {
        let status = r.status().as_u16();
        let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        return Err((status, retry, r.json().await.unwrap_or(Value::Null)));
    }
    Ok(Held(tokio::spawn(async move { while let Ok(Some(_)) = r.chunk().await {} })))
}

/// A gRPC refusal by the tenant's limit: RESOURCE_EXHAUSTED, `retry-after`, its own limit named.
fn assert_tenant_refusal(st: &tonic::Status, limit: usize, other_tenant: &str) {
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
    assert_eq!(st.metadata().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"), "{st:?}");
    let want = format!("your tenant has {limit} requests in flight, its limit (the per-tenant limit)");
    assert!(st.message().starts_with(&want), "{}", st.message());
    assert!(!st.message().contains(other_tenant), "{}", st.message());
}

/// An HTTP refusal by the tenant's limit: 429, `Retry-After`, OpenAI's shape, its own limit named.
fn assert_tenant_429(refusal: &(u16, Option<String>, Value), limit: usize, other_tenant: &str) {
    let (status, retry, body) = refusal;
    assert_eq!((*status, retry.as_deref()), (429, Some("1")), "{body}");
    let e = &body["error"];
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("rate_limit_error"), Some("rate_limit_exceeded")));
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains(&format!("your tenant has {limit} requests in flight, its limit")), "{body}");
    assert!(!msg.contains(other_tenant), "{body}");
}

#[test]
fn a_tenant_at_its_limit_is_refused_while_another_is_served_and_slots_come_back_on_every_path() {
    let _one = serial();
    // Two tenants: alpha (two keys) gets the default, half of --max-inflight; beta its own 1.
    let flags = [
        "--max-inflight",
        "8",
        "--api-key",
        "alpha:sk-alpha-1",
        "--api-key",
        "alpha:sk-alpha-2",
        "--api-key",
        "beta:sk-beta",
        "--tenant-limit",
        "beta=1",
    ];
    let c = Setup::start(&flags);
    let base = c.base();
    let expected = generate_reference(Some(BENIGN[0]), None, 24);
    let workers = c.worker_addrs();
    const ALPHA_LIMIT: usize = 4;
    rt().block_on(async {
        let mut client = client(&c.grpc).await;
        let web = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        let m = metrics(&web, &base).await;
        assert_eq!(sample(&m, "tandem_router_tenant_max_in_flight"), Some(ALPHA_LIMIT as f64), "the default is on");

        // alpha takes its 4 slots: long streams from both of its keys, on both APIs.
        let t0 = Instant::now();
        let mut alpha = Vec::new();
        for k in 0..ALPHA_LIMIT {
            let key = if k % 2 == 0 { "sk-alpha-1" } else { "sk-alpha-2" };
            let held = if k < 2 {
                hold_grpc(&mut client, key).await.unwrap()
            } else {
                hold_http(&web, &base, key).await.unwrap_or_else(|e| panic!("{e:?}"))
            };
            alpha.push(held);
        }
        // Its next requests are refused, on either key and either API, streaming or not.
        let mut refusals = 0;
        for key in ["sk-alpha-1", "sk-alpha-2"] {
            let st = hold_grpc(&mut client, key).await.err().expect("refused");
            assert_tenant_refusal(&st, ALPHA_LIMIT, "beta");
            let st = client.generate(authed(chat(BENIGN[0], 24), key)).await.expect_err("refused");
            assert_tenant_refusal(&st, ALPHA_LIMIT, "beta");
            let refusal = http_chat(&web, &base, key, greedy(BENIGN[0], 24)).await.unwrap_err();
            assert_tenant_429(&refusal, ALPHA_LIMIT, "beta");
            assert_tenant_429(&hold_http(&web, &base, key).await.err().expect("refused"), ALPHA_LIMIT, "beta");
            refusals += 4;
        }
        println!("alpha holds its {ALPHA_LIMIT} slots; {refusals} refusals after {:?}", t0.elapsed());

        // beta is served meanwhile, with the greedy text it gets alone, on both APIs ...
        let mut r = client.generate_stream(authed(chat(BENIGN[0], 24), "sk-beta")).await.unwrap().into_inner();
        let mut text = String::new();
        while let Some(m) = r.message().await.unwrap() {
            text.push_str(&m.text);
        }
        assert_eq!(text, expected, "beta over gRPC while alpha is at its limit");
        assert_eq!(http_chat(&web, &base, "sk-beta", greedy(BENIGN[0], 24)).await.unwrap(), expected);
        // ... up to its own limit of 1, whatever alpha holds.
        let beta = hold_grpc(&mut client, "sk-beta").await.unwrap();
        assert_tenant_refusal(&hold_grpc(&mut client, "sk-beta").await.err().expect("refused"), 1, "alpha");
        assert_tenant_429(&http_chat(&web, &base, "sk-beta", greedy(BENIGN[0], 4)).await.unwrap_err(), 1, "alpha");
        refusals += 2;
        drop(beta);

        // Slots come back on every path, each exactly once. A cancel (gRPC) and a disconnect
        // (HTTP) free two of alpha's; then more than its limit of requests, one after
        // another, ending each way: finished (both APIs), past their deadline.
        drop(alpha.drain(..2).collect::<Vec<_>>());
        drop(alpha.pop());
        // The router sees the cancels and the disconnect asynchronously.
        wait_metrics(&web, &base, "alpha's one remaining stream alone in flight", BOUND, |m| {
            sample(m, "tandem_router_requests_in_flight") == Some(1.0)
        })
        .await;
        let key = "sk-alpha-1";
        for i in 0..ALPHA_LIMIT + 2 {
            client.generate(authed(chat(BENIGN[1], 2), key)).await.unwrap_or_else(|e| panic!("gRPC {i}: {e:?}"));
            http_chat(&web, &base, key, greedy(BENIGN[1], 2)).await.unwrap_or_else(|e| panic!("HTTP {i}: {e:?}"));
            let mut late = authed(endless(LONG_TOKENS), key);
            late.set_timeout(Duration::from_millis(500));
            let st = client.generate(late).await.expect_err("past its deadline");
            // The router answers DEADLINE_EXCEEDED just before the transport's own CANCELLED.
            assert!(matches!(st.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{i}: {st:?}");
            let r = web
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(key)
                .header("x-request-timeout", "0.5")
                .json(&json!({"messages": [{"role": "user", "content": LONG}], "max_tokens": LONG_TOKENS,
                              "ignore_eos": true, "temperature": 0, "stream": true}))
                .send()
                .await
                .unwrap();
            // The deadline may pass before the first token (504) or after it (an error event).
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            assert!(status == 504 || body.contains("deadline"), "{i}: {status} {body}");
        }
        drop(alpha);

        // None leaked, none was given back twice: exactly the limit fits again.
        let end = Instant::now() + BOUND;
        let mut again = Vec::new();
        while again.len() < ALPHA_LIMIT {
            match hold_grpc(&mut client, "sk-alpha-2").await {
                Ok(h) => again.push(h),
                Err(st) => assert!(Instant::now() < end, "alpha holds {} of {ALPHA_LIMIT}: {st:?}", again.len()),
            }
        }
        assert_tenant_refusal(&hold_grpc(&mut client, "sk-alpha-1").await.err().expect("refused"), ALPHA_LIMIT, "beta");
        refusals += 1;
        drop(again);

        // Counted by reason, never by key or tenant.
        let m = metrics(&web, &base).await;
        let counted = sample(&m, r#"tandem_router_admission_refusals_total{reason="tenant_limit"}"#);
        assert!(counted.is_some_and(|n| n >= refusals as f64), "{refusals} refusals made, {counted:?} counted");
        // Keys never appear; tenants only as the label of the per-tenant service metrics
        // (`tandem_tenant_*`, bounded by the configured tenants), never on refusals.
        assert!(!m.contains("sk-"), "a key in the metrics");
        let named: Vec<&str> = m.lines().filter(|l| l.contains("alpha")).collect();
        assert!(named.iter().all(|l| l.starts_with("tandem_tenant_")), "a tenant in other metrics: {named:?}");
        wait_metrics(&web, &base, "nothing in flight", BOUND, |m| {
            sample(m, "tandem_router_requests_in_flight") == Some(0.0)
        })
        .await;
        idle_workers(&workers).await;
        let mut r = client.generate_stream(authed(chat(BENIGN[0], 24), "sk-alpha-2")).await.unwrap().into_inner();
        let mut text = String::new();
        while let Some(m) = r.message().await.unwrap() {
            text.push_str(&m.text);
        }
        assert_eq!(text, expected, "alpha after it all");
        idle_workers(&workers).await;
    });
    c.no_panics();
}

// ---------------------------------------------------------------------------
// Stalled readers

/// The router's stall timeout in this test, in seconds.
const STALL_SECS: &str = "2";

/// The in-flight limit the stalled clients fill.
const MAX_INFLIGHT: usize = 8;

/// How many of them speak HTTP/1.1 (the rest gRPC). Each costs a few MiB of output before
/// its socket buffers are full (the kernel's send buffer grows to 4 MiB on loopback).
const STALLED_HTTP: usize = 2;

/// A gRPC stream whose client reads nothing: HTTP/2 lets the router send it one byte.
struct StalledGrpc {
    _client: GenerateClient<Channel>,
    stream: tonic::Streaming<api::GenerateStreamResponse>,
}

async fn stalled_grpc(addr: &str) -> StalledGrpc {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(1)
        .connect()
        .await
        .unwrap();
    let mut client = GenerateClient::new(channel);
    let stream = client.generate_stream(endless(LONG_TOKENS)).await.unwrap().into_inner();
    StalledGrpc { _client: client, stream }
}

/// An HTTP/1.1 streaming chat whose client never reads its socket, which has a receive
/// buffer of a few KiB. Each event carries 20 alternatives per token and 8 choices run at
/// once, so the socket buffers fill after a few hundred tokens per choice.
async fn stalled_http(addr: &str) -> TcpStream {
    let body = json!({
        "messages": [{"role": "user", "content": LONG}], "max_tokens": LONG_TOKENS, "ignore_eos": true,
        "temperature": 0, "stream": true, "n": 8, "logprobs": true, "top_logprobs": 20,
    })
    .to_string();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(addr.parse().unwrap()).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: tandem\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    s
}

#[test]
fn streams_nobody_reads_are_cancelled_after_the_stall_timeout_and_free_every_slot_and_block() {
    let _one = serial();
    let max = MAX_INFLIGHT.to_string();
    // The decode worker has KV room for every stalled choice: the attack stalls on its
    // readers, never on KV.
    let c = Setup::start(&["--max-inflight", &max, "--stream-stall-timeout", STALL_SECS]);
    let (router_addr, http, base) = (c.grpc.clone(), c.http.clone(), c.base());
    let expected = generate_reference(Some(BENIGN[0]), None, 24);
    let workers = c.worker_addrs();
    rt().block_on(async {
        let web = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        let mut client = client(&router_addr).await;
        assert_eq!(stream(&mut client, chat(BENIGN[0], 24)).await.unwrap().text, expected);

        // Eight clients that never read take every slot.
        let t0 = Instant::now();
        let mut grpc = Vec::new();
        let mut raw = Vec::new();
        for i in 0..MAX_INFLIGHT {
            if i < STALLED_HTTP {
                raw.push(stalled_http(&http).await);
            } else {
                grpc.push(stalled_grpc(&router_addr).await);
            }
        }
        wait_metrics(&web, &base, "the stalled clients in flight", BOUND, |m| {
            sample(m, "tandem_router_requests_in_flight") == Some(MAX_INFLIGHT as f64)
        })
        .await;
        // They hold the router: a normal client is refused.
        let st = stream(&mut client, chat(BENIGN[0], 24)).await.expect_err("the stalled clients hold every slot");
        assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
        println!("{MAX_INFLIGHT} stalled clients hold every slot after {:?}", t0.elapsed());

        // After the stall timeout each is cancelled, counted once by its API.
        let stalls = |api: &str| format!(r#"tandem_stream_stalls_total{{api="{api}"}}"#);
        let (want_grpc, want_http) = ((MAX_INFLIGHT - STALLED_HTTP) as f64, STALLED_HTTP as f64);
        wait_metrics(&web, &base, "every stalled stream cancelled", Duration::from_secs(300), |m| {
            sample(m, &stalls("grpc")) == Some(want_grpc)
                && sample(m, &stalls("http")) == Some(want_http)
                && sample(m, "tandem_router_requests_in_flight") == Some(0.0)
        })
        .await;
        println!("every stalled stream cancelled after {:?}", t0.elapsed());

        // With the stalled clients still connected, a normal client is served the same text.
        assert_eq!(stream(&mut client, chat(BENIGN[0], 24)).await.unwrap().text, expected, "gRPC");
        assert_eq!(stream_chat(&web, &base, BENIGN[0]).await.unwrap(), expected, "HTTP");
        idle_workers(&workers).await;

        // A stalled client that reads again gets what was queued, then why its stream ended.
        let mut g = grpc.pop().unwrap();
        let ended = loop {
            match tokio::time::timeout(BOUND, g.stream.message()).await.expect("the stream moves") {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a stalled stream ended as if finished"),
                Err(st) => break st,
            }
        };
        assert_eq!(ended.code(), tonic::Code::Cancelled, "{ended:?}");
        assert!(ended.message().contains("--stream-stall-timeout"), "{ended:?}");
        let mut s = raw.pop().unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let end = tokio::time::Instant::now() + BOUND;
        while !String::from_utf8_lossy(&got[got.len().saturating_sub(4096)..]).contains("--stream-stall-timeout") {
            match tokio::time::timeout_at(end, s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                other => panic!("the stalled HTTP stream ended without its error event: {other:?}"),
            }
        }
        println!("a stalled HTTP client read {} KiB queued before its error event", got.len() >> 10);
        assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got[..got.len().min(200)]));

        let logged = c.router.stderr().iter().filter(|l| l.contains("took nothing of its stream")).count();
        assert_eq!(logged, MAX_INFLIGHT, "one log line per stalled stream");
        drop((grpc, raw));
        idle_workers(&workers).await;
    });
    c.no_panics();
}
