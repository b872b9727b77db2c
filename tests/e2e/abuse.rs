//! Hostile clients against a real cluster (router, prefill and decode workers as
//! separate `tandem` processes on etcd):
//! - the router's HTTP front door: a megabyte of headers, a thousand header fields,
//!   headers trickled a byte at a time, a body that stalls, JSON nested 10,000 deep,
//!   oversized `n` / `max_tokens` / `stop` / token arrays / prompts / bodies, fields
//!   Tandem does not implement, and a request deadline, each answered with its 4xx/5xx
//!   (OpenAI's error shape where a body is possible) or a closed connection within its
//!   bound, while benign streams run alongside and produce the same text as alone;
//! - the gRPC ports of the router and the workers (random bytes, HTTP/1, a truncated
//!   HTTP/2 preface, half a preface and then silence, well-formed gRPC calls whose
//!   protobuf does not decode) and the decode worker's KV port (garbage, forged
//!   handshakes, forged and replayed `Blocks` frames for requests that do not exist,
//!   frames of the wrong layout), all refused.
//!
//! Afterwards every process still serves, none printed a panic, and the workers hold
//! no KV block. Timings are printed, never asserted beyond generous bounds.

mod harness;
mod hostile;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::*;
use hostile::*;
use serde_json::{json, Value};
use tandem_kernels::BlockId;
use tandem_kvtransfer::wire::{self, Code, Frame};
use tandem_kvtransfer::{KvAuth, KvDtypeWire, KvLayout};
use tandem_proto::auth::ClusterToken;
use tandem_proto::ids::{ClusterRequestId, LeaseId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The router's header and body read timeouts in these tests, in seconds.
const READ_TIMEOUT_SECS: &str = "2";

/// A forged sender claims no discovery lease.
const NO_LEASE: Option<LeaseId> = None;

/// A deterministic byte source (xorshift64*), so a failure replays.
struct Rng(u64);

impl Rng {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// HTTP

/// What a raw TCP exchange came to: the bytes the server sent before it closed (or
/// before `BOUND`), whether it closed, and when.
#[derive(Debug)]
struct Exchange {
    reply: String,
    closed: bool,
    took: Duration,
}

/// Reads until the server closes (EOF or reset) or `BOUND` passes.
async fn read_until_closed(rd: &mut (impl tokio::io::AsyncRead + Unpin), t0: Instant) -> Exchange {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let closed = loop {
        match tokio::time::timeout_at((t0 + BOUND).into(), rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    Exchange { reply: String::from_utf8_lossy(&got).into_owned(), closed, took: t0.elapsed() }
}

/// Sends `request` whole (while reading, so a server that answers early is heard) and
/// keeps the connection open for writing; what came back.
async fn send_and_read(addr: &str, request: Vec<u8>) -> Exchange {
    let (mut rd, mut wr) = TcpStream::connect(addr).await.unwrap().into_split();
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        // Hold the write side open: only the server may end the exchange.
        tokio::time::sleep(BOUND).await;
        drop(wr);
    });
    let ex = read_until_closed(&mut rd, t0).await;
    writer.abort();
    ex
}

/// 1,000 headers of 1 KB each (a megabyte) before a request that would be answered 200.
async fn megabyte_of_headers(addr: String) -> Exchange {
    let mut req = b"GET /health HTTP/1.1\r\nHost: tandem\r\n".to_vec();
    let pad = "a".repeat(1000);
    for i in 0..1000 {
        req.extend_from_slice(format!("X-Pad-{i}: {pad}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    send_and_read(&addr, req).await
}

/// 1,000 header fields of a few bytes each (12 KB: under the size bound, over the count).
async fn many_header_fields(addr: String) -> Exchange {
    let mut req = b"GET /health HTTP/1.1\r\nHost: tandem\r\n".to_vec();
    for i in 0..1000 {
        req.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    send_and_read(&addr, req).await
}

/// A request line, then a header trickled one byte every 250 ms, never finished.
async fn slowloris(addr: String) -> Exchange {
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let t0 = Instant::now();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: tandem\r\nX-Slow: ").await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let trickle = tokio::spawn(async move {
        while t0.elapsed() < BOUND {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if wr.write_all(b"z").await.is_err() {
                break;
            }
        }
    });
    let ex = read_until_closed(&mut rd, t0).await;
    trickle.abort();
    ex
}

/// Headers announcing a 1,000-byte body, 14 bytes of it, then nothing.
async fn stalled_body(addr: String) -> Exchange {
    let req = "POST /v1/chat/completions HTTP/1.1\r\nHost: tandem\r\nContent-Type: application/json\r\n\
               Content-Length: 1000\r\n\r\n{\"messages\": [";
    send_and_read(&addr, req.as_bytes().to_vec()).await
}

/// One request the API must refuse: where, what, and the status and `param` expected.
struct Refusal {
    what: &'static str,
    path: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
    /// The field the error names, or a phrase its message holds.
    param: Option<&'static str>,
    message: Option<&'static str>,
}

fn refusals() -> Vec<Refusal> {
    let msgs = json!([{"role": "user", "content": "Say hello in French."}]);
    let chat = |extra: Value| {
        let mut v = json!({"messages": msgs, "max_tokens": 8});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v.to_string().into_bytes()
    };
    let refuse = |what, path, body, status, param| Refusal {
        what,
        path,
        body,
        headers: vec![],
        status,
        param: Some(param),
        message: None,
    };
    let deep = 10_000;
    let nested =
        format!(r#"{{"messages": [{{"role": "user", "content": {}{}}}]}}"#, "[".repeat(deep), "]".repeat(deep));
    let nested = nested.into_bytes();
    let nested_objects = format!("{}1{}", r#"{"a": "#.repeat(deep), "}".repeat(deep)).into_bytes();
    let ids = json!({"prompt": vec![1u32; 500_000], "max_tokens": 4}).to_string().into_bytes();
    let giant_prompt = json!({"prompt": "lorem ipsum ".repeat(300_000), "max_tokens": 4}).to_string().into_bytes();
    let many_messages = json!({"messages": vec![json!({"role": "user", "content": "x"}); 100_000]});
    let stops: Vec<String> = (0..10_000).map(|i| format!("stop-{i}")).collect();
    let c = "/v1/chat/completions";
    let p = "/v1/completions";
    vec![
        Refusal {
            message: Some("deeper than 128 levels"),
            param: None,
            ..refuse("JSON nested 10,000 deep", c, nested, 400, "")
        },
        Refusal {
            message: Some("deeper than 128 levels"),
            param: None,
            ..refuse("objects nested 10,000 deep", p, nested_objects, 400, "")
        },
        refuse("huge n", c, chat(json!({"n": 1_000_000_000_000i64})), 400, "n"),
        refuse("n above the limit", c, chat(json!({"n": 1000})), 400, "n"),
        refuse("huge max_tokens", c, chat(json!({"max_tokens": 1_000_000_000_000i64})), 400, "max_tokens"),
        refuse("max_tokens over the context", c, chat(json!({"max_tokens": 1_000_000})), 400, "max_tokens"),
        refuse("10,000 stop strings", c, chat(json!({"stop": stops})), 400, "stop"),
        refuse("a 100 KB stop string", c, chat(json!({"stop": "s".repeat(100_000)})), 400, "stop"),
        refuse("100,000 stop token ids", c, chat(json!({"stop_token_ids": vec![2; 100_000]})), 400, "stop_token_ids"),
        refuse("top_logprobs 1000", c, chat(json!({"logprobs": true, "top_logprobs": 1000})), 400, "top_logprobs"),
        refuse("logprobs 1000", p, json!({"prompt": "x", "logprobs": 1000}).to_string().into_bytes(), 400, "logprobs"),
        refuse("500,000 prompt token ids", p, ids, 400, "prompt"),
        refuse("a 3.6 MB prompt", p, giant_prompt, 400, "prompt"),
        refuse(
            "a prompt of nothing but a control character",
            p,
            json!({"prompt": "\u{1d}"}).to_string().into_bytes(),
            400,
            "prompt",
        ),
        refuse("100,000 messages", c, many_messages.to_string().into_bytes(), 400, "messages"),
        Refusal { message: Some("larger than"), param: None, ..refuse("a 5 MB body", p, vec![b' '; 5 << 20], 413, "") },
        refuse("tools", c, chat(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})), 400, "tools"),
        refuse("tool_choice", c, chat(json!({"tool_choice": "required"})), 400, "tool_choice"),
        refuse("functions", c, chat(json!({"functions": [{"name": "f"}]})), 400, "functions"),
        refuse("function_call", c, chat(json!({"function_call": {"name": "f"}})), 400, "function_call"),
        refuse(
            "a JSON Schema that does not compile",
            c,
            chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}})),
            400,
            "response_format",
        ),
        refuse("a 100 KB regex", c, chat(json!({"guided_regex": "a".repeat(100_000)})), 400, "guided_regex"),
        refuse("100,000 choices", c, chat(json!({"guided_choice": vec!["x"; 100_000]})), 400, "guided_choice"),
        refuse("two guides", c, chat(json!({"guided_regex": "a", "guided_choice": ["b"]})), 400, "guided_choice"),
        refuse("logit_bias", c, chat(json!({"logit_bias": {"100": 50}})), 400, "logit_bias"),
        refuse("a negative seed", c, chat(json!({"seed": -7})), 400, "seed"),
        Refusal {
            headers: vec![("x-request-timeout", "soon")],
            ..refuse("a bad x-request-timeout", c, chat(json!({})), 400, "x-request-timeout")
        },
        Refusal {
            headers: vec![("x-request-timeout", "0.3")],
            param: None,
            message: Some("deadline"),
            ..refuse("a request past its deadline", c, chat(json!({"max_tokens": 1000, "ignore_eos": true})), 504, "")
        },
    ]
}

/// Sends every refusal; each must get its status and an OpenAI-shaped error naming it.
async fn api_abuse(web: reqwest::Client, base: String, refusals: Vec<Refusal>) -> Vec<(&'static str, Duration)> {
    let mut took = Vec::new();
    for r in refusals {
        let t0 = Instant::now();
        let mut req = web.post(format!("{base}{}", r.path)).header("content-type", "application/json");
        for (k, v) in &r.headers {
            req = req.header(*k, *v);
        }
        let resp = req.body(r.body).send().await.unwrap_or_else(|e| panic!("{}: {e}", r.what));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        took.push((r.what, t0.elapsed()));
        assert_eq!(status, r.status, "{}: {}", r.what, &text[..text.len().min(400)]);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {text}", r.what));
        let err = &v["error"];
        assert!(err["message"].is_string() && err["type"].is_string(), "{}: not OpenAI's shape: {text}", r.what);
        if let Some(p) = r.param {
            assert_eq!(err["param"], p, "{}: {text}", r.what);
        }
        if let Some(m) = r.message {
            assert!(err["message"].as_str().unwrap().contains(m), "{}: {text}", r.what);
        }
    }
    took
}

#[test]
fn hostile_http_clients_get_their_4xx_within_bounds_and_benign_streams_are_unchanged() {
    let _one = serial();
    let flags = ["--http-header-timeout", READ_TIMEOUT_SECS, "--http-body-timeout", READ_TIMEOUT_SECS];
    let c = Cluster::start_with(&[("prefill", "prefill-0"), ("decode", "decode-0")], &flags);
    let http = c.router.addr_after("tandem: router", "http");
    let base = format!("http://{http}");
    rt().block_on(async {
        let web = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        let refusals = refusals();
        let mut reference = Vec::new();
        for p in BENIGN {
            reference.push(stream_chat(&web, &base, p).await.unwrap());
        }

        // Benign streams, over and over while the attacks run.
        let stop = Arc::new(AtomicBool::new(false));
        let mut benign = Vec::new();
        for (prompt, expected) in BENIGN.into_iter().zip(reference.clone()) {
            let (web, base, stop) = (web.clone(), base.clone(), stop.clone());
            benign.push(tokio::spawn(async move {
                let mut done = 0;
                while !stop.load(Ordering::SeqCst) && done < 500 {
                    let got =
                        stream_chat(&web, &base, prompt).await.unwrap_or_else(|e| panic!("benign {prompt:?}: {e}"));
                    assert_eq!(got, expected, "benign stream {prompt:?} changed under attack");
                    done += 1;
                }
                done
            }));
        }

        // Each attack on its own task, so that none waits on another's client-side work.
        let big = tokio::spawn(megabyte_of_headers(http.clone()));
        let many = tokio::spawn(many_header_fields(http.clone()));
        let slow = tokio::spawn(slowloris(http.clone()));
        let stalled = tokio::spawn(stalled_body(http.clone()));
        let api = tokio::spawn(api_abuse(web.clone(), base.clone(), refusals));
        let (big, many, slow, stalled) =
            (big.await.unwrap(), many.await.unwrap(), slow.await.unwrap(), stalled.await.unwrap());
        let api = api.await.unwrap();
        stop.store(true, Ordering::SeqCst);
        let mut streams = Vec::new();
        for b in benign {
            streams.push(b.await.unwrap());
        }

        println!("1 MB of headers: {:?} after {:?}", status_of(&big.reply), big.took);
        println!("1,000 header fields: {:?} after {:?}", status_of(&many.reply), many.took);
        println!("slowloris: closed {} after {:?}, reply {:?}", slow.closed, slow.took, status_of(&slow.reply));
        println!("stalled body: {:?} after {:?}", status_of(&stalled.reply), stalled.took);
        for (what, took) in &api {
            println!("{what}: refused after {took:?}");
        }
        println!("benign streams completed alongside: {streams:?}");

        // A megabyte of headers is never taken in: 431 (or a reset before hyper's answer
        // arrives), and the connection closed.
        assert!(big.closed, "1 MB of headers: the connection stayed open: {big:?}");
        assert!(matches!(status_of(&big.reply), None | Some(431)), "1 MB of headers: {}", big.reply);
        assert!(!big.reply.contains(" 200 "), "1 MB of headers were accepted");
        assert!(many.closed && status_of(&many.reply) == Some(431), "1,000 header fields: {many:?}");
        // The trickled headers are cut off at the header read timeout, with nothing served.
        assert!(slow.closed, "slowloris: still connected after {BOUND:?}");
        assert!(!slow.reply.contains(" 200 "), "slowloris was served: {}", slow.reply);
        // The stalled body gets 408 in OpenAI's shape, and the connection closes.
        assert_eq!(status_of(&stalled.reply), Some(408), "stalled body: {stalled:?}");
        assert!(stalled.reply.contains(r#""type":"invalid_request_error""#), "{}", stalled.reply);
        assert!(stalled.closed, "stalled body: the connection stayed open");
        assert!(streams.iter().all(|&n| n >= 1), "every benign loop completed a stream: {streams:?}");

        // Nothing is left behind, and the front door still serves.
        let addrs: Vec<String> = c.workers.iter().map(|(_, a)| a.clone()).collect();
        idle_workers(&addrs).await;
        for (p, expected) in BENIGN.iter().zip(&reference) {
            assert_eq!(&stream_chat(&web, &base, p).await.unwrap(), expected);
        }
    });
    let mut procs = vec![&c.router];
    procs.extend(c.workers.iter().map(|(p, _)| p));
    no_panics(&procs);
}

// ---------------------------------------------------------------------------
// gRPC and KV ports

/// Protobuf bodies that cannot decode as any message.
fn malformed_protobuf(rng: &mut Rng) -> Vec<(&'static str, Vec<u8>)> {
    let mut random = vec![0x00];
    random.extend(rng.bytes(512));
    vec![
        ("field number 0", vec![0x00]),
        ("truncated varint", vec![0x08, 0xff]),
        ("length past the end", vec![0x12, 0x7f, b'a']),
        ("wire type 6", vec![0x0e, 0x01]),
        ("wire type 7", vec![0x0f, 0x01]),
        ("unterminated group", vec![0x0b]),
        ("10-byte varint overflow", vec![0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
        ("random bytes after a zero tag", random),
    ]
}

const ROUTER_METHODS: [(&str, bool); 4] = [
    ("/tandem.v1.Generate/Generate", false),
    ("/tandem.v1.Generate/GenerateStream", true),
    ("/tandem.v1.Generate/Tokenize", false),
    ("/tandem.v1.Generate/ListModels", false),
];

const WORKER_METHODS: [(&str, bool); 7] = [
    ("/tandem.worker.v1.Worker/Reserve", false),
    ("/tandem.worker.v1.Worker/Prefill", false),
    ("/tandem.worker.v1.Worker/Decode", true),
    ("/tandem.worker.v1.Worker/Cancel", false),
    ("/tandem.worker.v1.Worker/Stats", false),
    ("/tandem.worker.v1.Worker/KvEvents", true),
    ("/tandem.worker.v1.Worker/Drain", true),
];

/// Raw bytes at a gRPC (HTTP/2) port: the server must close without serving anything.
async fn garbage_at_grpc_port(addr: &str, rng: &mut Rng) {
    let truncated_preface = b"PRI * HTTP/2.0\r\n\r\nSM".to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", rng.bytes(4096)),
        (
            "an HTTP/1 request",
            b"POST /tandem.v1.Generate/Generate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
        ("a truncated HTTP/2 preface", truncated_preface),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let t0 = Instant::now();
        let _ = s.write_all(&bytes).await;
        // Whatever the server waits for next never comes.
        let _ = s.shutdown().await;
        let ex = read_until_closed(&mut s, t0).await;
        println!("{addr}: {what}: closed {} after {:?} ({} bytes back)", ex.closed, ex.took, ex.reply.len());
        assert!(ex.closed, "{addr}: {what}: the connection stayed open");
        assert!(!ex.reply.contains(" 200 "), "{addr}: {what}: answered {}", ex.reply);
    }
}

/// Half an HTTP/2 preface, then silence with the socket held open: the server closes it
/// at its handshake deadline (10 s) rather than holding it for as long as the client does.
async fn stalled_preface(addr: String) -> Exchange {
    send_and_read(&addr, b"PRI * HTTP/2.0\r\n".to_vec()).await
}

/// Reads frames from a KV connection until one decodes, the connection closes, or 10 s pass.
async fn next_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Frame<'static>> {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some((frame, used))) = wire::decode(buf, 1 << 20, 0) {
            let frame = owned(frame);
            buf.drain(..used);
            return Some(frame);
        }
        match tokio::time::timeout_at(end, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// A receiver's frames (handshake answers, acks, errors) own their data: keep them
/// beyond the read buffer.
fn owned(f: Frame<'_>) -> Frame<'static> {
    match f {
        Frame::HelloOk => Frame::HelloOk,
        Frame::Ack { request_id, code, message } => Frame::Ack { request_id, code, message },
        Frame::Error { code, message } => Frame::Error { code, message },
        other => panic!("a receiver sent {other:?}"),
    }
}

/// Whether the server closes the connection within 10 s (after answering whatever it answers).
async fn closes(s: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 4096];
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(end, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// The layout the cluster's workers use: the model's shape, 16-token f16 blocks.
fn cluster_layout() -> KvLayout {
    let gguf = tandem_text::gguf::GgufFile::open(&model()).unwrap();
    let c = tandem_text::config::ModelConfig::from_gguf(&gguf).unwrap();
    KvLayout {
        n_layers: c.n_layers as u16,
        n_kv_heads: c.n_kv_heads as u16,
        head_dim: c.head_dim as u16,
        block_size: 16,
        dtype: KvDtypeWire::F16,
        fingerprint: c.fingerprint(),
    }
}

/// A Hello signed with the key of the test's cluster, as its prefill workers sign theirs.
fn signed_hello(layout: &KvLayout) -> Vec<u8> {
    wire::encode_hello_signed(layout, NO_LEASE, Some(&KvAuth::from_secret(cluster_token().secret())))
}

/// Garbage, forged handshakes and forged or replayed frames at a decode worker's KV port.
async fn forgeries_at_kv_port(addr: &str, rng: &mut Rng) {
    let layout = cluster_layout();
    let lbb = layout.layer_block_bytes();

    // Garbage and an HTTP request: no handshake, the connection ends.
    for (what, bytes) in [("random bytes", rng.bytes(4096)), ("an HTTP request", b"GET / HTTP/1.1\r\n\r\n".to_vec())] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&bytes).await;
        let mut buf = Vec::new();
        let reply = next_frame(&mut s, &mut buf).await;
        assert!(matches!(reply, None | Some(Frame::Error { .. })), "{what}: {reply:?}");
        assert!(closes(&mut s).await, "KV port, {what}: the connection stayed open");
    }

    // A stranger's Hello (not signed with the cluster's key) is refused before anything
    // else, whatever it claims (issue 15, item 3).
    for (what, hello) in [
        ("an unsigned Hello", wire::encode_hello(&layout, NO_LEASE)),
        ("a forged tag", {
            let stranger = KvAuth::from_secret(ClusterToken::random().secret());
            wire::encode_hello_signed(&layout, NO_LEASE, Some(&stranger))
        }),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&hello).await.unwrap();
        let mut buf = Vec::new();
        let reply = next_frame(&mut s, &mut buf).await;
        assert!(matches!(reply, Some(Frame::Error { code: Code::Unauthenticated, .. })), "{what}: {reply:?}");
        assert!(closes(&mut s).await, "KV port, {what}: the connection stayed open");
    }

    // Past that, as an insider holding the key. Forged handshakes: another model's
    // fingerprint, a layout of zeros. Refused, closed.
    let other = KvLayout { fingerprint: layout.fingerprint ^ 1, ..layout };
    let zeros = KvLayout { n_layers: 0, n_kv_heads: 0, head_dim: 0, block_size: 0, ..layout };
    for (what, hello) in [("another model's layout", other), ("a layout of zeros", zeros)] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&signed_hello(&hello)).await.unwrap();
        let mut buf = Vec::new();
        let reply = next_frame(&mut s, &mut buf).await;
        // Told that it does not fit, not what would (issue 15, item 1).
        let generic = matches!(&reply, Some(Frame::Error { code: Code::LayoutMismatch, message }) if message == "layout mismatch");
        assert!(generic, "{what}: {reply:?}");
        assert!(closes(&mut s).await, "KV port, {what}: the connection stayed open");
    }

    // The right layout passes the handshake, but frames for requests nobody reserved are
    // refused one by one, sent once or replayed, on this connection and a second one.
    let ids: Vec<ClusterRequestId> =
        rng.bytes(8 * 4).chunks(8).map(|c| ClusterRequestId(u64::from_le_bytes(c.try_into().unwrap()))).collect();
    let payload = rng.bytes(2 * lbb);
    for round in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        s.write_all(&signed_hello(&layout)).await.unwrap();
        let ok = next_frame(&mut s, &mut buf).await;
        assert!(matches!(ok, Some(Frame::HelloOk)), "the right layout: {ok:?}");
        for &id in &ids {
            for (layer, blocks) in
                [(0u16, [BlockId(0), BlockId(1)]), (layout.n_layers - 1, [BlockId(u32::MAX - 1), BlockId(u32::MAX)])]
            {
                let frame = wire::encode_blocks(id, layer, &blocks, &payload);
                // Sent twice: the replay is refused as the original was.
                for _ in 0..2 {
                    s.write_all(&frame).await.unwrap();
                    let ack = next_frame(&mut s, &mut buf).await;
                    let refused = matches!(&ack, Some(Frame::Ack { request_id, code, .. })
                        if *request_id == id && *code != Code::Ok);
                    assert!(refused, "round {round}: forged blocks for {id:#x} layer {layer}: {ack:?}");
                }
            }
            s.write_all(&wire::encode_finish(id, 1, 16)).await.unwrap();
            let ack = next_frame(&mut s, &mut buf).await;
            assert!(
                matches!(&ack, Some(Frame::Ack { request_id, code, .. }) if *request_id == id && *code != Code::Ok),
                "round {round}: a forged Finish for {id:#x}: {ack:?}"
            );
            s.write_all(&wire::encode_abort(id, Code::Aborted, "forged")).await.unwrap();
        }
        // Frames of the wrong layout end the connection: a payload one byte short of
        // its blocks, then (on a fresh connection) blocks written "in place" over TCP.
        let mut short = wire::encode_blocks(ids[0], 0, &[BlockId(0)], &payload[..lbb - 1]);
        if round == 1 {
            short = wire::encode_blocks_in_place(ids[0], 0, &[BlockId(0), BlockId(1)]);
        }
        s.write_all(&short).await.unwrap();
        let err = next_frame(&mut s, &mut buf).await;
        assert!(matches!(err, Some(Frame::Error { code: Code::Protocol, .. })), "round {round}: {err:?}");
        assert!(closes(&mut s).await, "round {round}: the connection stayed open after a protocol error");
    }
}

/// After a valid Hello, Finish headers claiming 64 MiB bodies on ten connections, then
/// silence (issue 15, item 1): each is refused at once, and the decode worker's memory
/// does not grow by the 640 MiB they claim (it grew by that before the fix).
async fn huge_claims_at_kv_port(addr: &str, decode: &Proc) {
    let layout = cluster_layout();
    let before = decode.rss_kib();
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        s.write_all(&signed_hello(&layout)).await.unwrap();
        assert!(matches!(next_frame(&mut s, &mut buf).await, Some(Frame::HelloOk)));
        let mut header = wire::encode_finish(ClusterRequestId(1), 2, 3)[..wire::HEADER_LEN].to_vec();
        header[8..12].copy_from_slice(&(64u32 << 20).to_le_bytes());
        s.write_all(&header).await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = decode.rss_kib();
    for s in &mut held {
        assert!(closes(s).await, "KV port: a 64 MiB Finish header left its connection open");
    }
    println!("KV port {addr}: 10 headers claiming 64 MiB: decode RSS {before} -> {after} KiB");
    assert!(after < before + (32 << 10), "decode worker RSS {before} -> {after} KiB");
}

#[test]
fn garbage_at_the_control_and_kv_ports_is_refused_and_leaves_nothing_behind() {
    let _one = serial();
    let c = Cluster::start(&[("prefill", "prefill-0"), ("decode", "decode-0")]);
    let decode = &c.workers[1].0;
    let kv = decode.addr_after("tandem: worker", "kv");
    let worker_addrs: Vec<String> = c.workers.iter().map(|(_, a)| a.clone()).collect();
    let expected = generate_reference(Some(BENIGN[0]), None, 24);
    rt().block_on(async {
        let mut rng = Rng(0x7a6e_6465_6d5f_6162);
        let mut client = client(&c.router_addr).await;
        assert_eq!(stream(&mut client, chat(BENIGN[0], 24)).await.unwrap().text, expected);

        let mut ports = vec![c.router_addr.clone()];
        ports.extend(worker_addrs.iter().cloned());
        for addr in &ports {
            garbage_at_grpc_port(addr, &mut rng).await;
        }
        let targets: Vec<(&String, &[(&str, bool)])> = std::iter::once((&c.router_addr, &ROUTER_METHODS[..]))
            .chain(worker_addrs.iter().map(|a| (a, &WORKER_METHODS[..])))
            .collect();
        for (addr, methods) in targets {
            // A worker's methods refuse a stranger before they decode anything (issue 15,
            // item 3); the decoding is checked as an insider holding the cluster token.
            let worker = !std::ptr::eq(methods, &ROUTER_METHODS[..]);
            let insider = worker.then(cluster_token);
            for &(method, streaming) in methods {
                for (what, body) in malformed_protobuf(&mut rng) {
                    if worker {
                        let st = raw_grpc::call(addr, method, body.clone(), streaming).await;
                        assert_eq!(st.code(), tonic::Code::Unauthenticated, "{addr} {method}, a stranger: {st:?}");
                    }
                    let st = raw_grpc::call_as(addr, method, body, streaming, insider).await;
                    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{addr} {method} with {what}: {st:?}");
                }
                // A message over the 4 MiB limit is refused before it is decoded.
                let st = raw_grpc::call_as(addr, method, vec![0x0a; 5 << 20], streaming, insider).await;
                assert_ne!(st.code(), tonic::Code::Ok, "{addr} {method} with 5 MiB: {st:?}");
            }
        }
        println!("gRPC: {} ports refused random bytes, HTTP/1 and a truncated preface", ports.len());
        let stalls: Vec<_> = ports.iter().map(|a| tokio::spawn(stalled_preface(a.clone()))).collect();
        for (addr, t) in ports.iter().zip(stalls) {
            let ex = t.await.unwrap();
            println!("{addr}: a stalled preface closed {} after {:?}", ex.closed, ex.took);
            assert!(ex.closed, "{addr}: a connection stalled mid-preface was still open after {BOUND:?}");
            assert!(ex.took >= Duration::from_secs(9), "{addr}: closed before its handshake deadline: {ex:?}");
        }

        forgeries_at_kv_port(&kv, &mut rng).await;
        println!("KV port {kv}: garbage, forged handshakes and forged or replayed frames refused");
        huge_claims_at_kv_port(&kv, decode).await;

        // Every process still serves, and no block is held anywhere.
        idle_workers(&worker_addrs).await;
        for a in &worker_addrs {
            assert!(!stats(a).await.draining, "worker {a} was made to drain");
        }
        assert_eq!(stream(&mut client, chat(BENIGN[0], 24)).await.unwrap().text, expected);
        idle_workers(&worker_addrs).await;
    });
    let mut procs = vec![&c.router];
    procs.extend(c.workers.iter().map(|(p, _)| p));
    no_panics(&procs);
}
