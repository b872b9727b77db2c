//! What the hostile-client tests share (abuse.rs, front_door.rs): the bound on any one
//! exchange, benign prompts, and checks that the cluster is unharmed.
#![allow(dead_code)] // each test file uses its own part

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{stats, Proc};

/// How long any single hostile exchange may take before the test fails: far beyond the
/// configured bounds, so only a missing bound trips it.
pub const BOUND: Duration = Duration::from_secs(30);

pub const BENIGN: [&str; 2] = ["Write a haiku about the sea.", "List three animals that live in the ocean."];

pub fn no_panics(procs: &[&Proc]) {
    for p in procs {
        let out = p.output();
        assert!(!out.iter().any(|l| l.contains("panicked")), "{} panicked:\n{}", p.name, out.join("\n"));
    }
}

pub async fn idle_workers(addrs: &[String]) {
    let end = Instant::now() + Duration::from_secs(15);
    for a in addrs {
        loop {
            let s = stats(a).await;
            let idle = (s.running, s.waiting, s.waiting_for_kv, s.kv_blocks_used) == (0, 0, 0, 0);
            if idle {
                break;
            }
            assert!(Instant::now() < end, "worker {a} still holds something: {s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A greedy chat completion streamed over SSE; its text, or the error event / status.
pub async fn stream_chat(web: &reqwest::Client, base: &str, prompt: &str) -> Result<String, String> {
    let body = json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 24, "temperature": 0, "stream": true,
    });
    let mut r = web.post(format!("{base}/v1/chat/completions")).json(&body).send().await.map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("status {}: {}", r.status(), r.text().await.unwrap_or_default()));
    }
    let (mut buf, mut text) = (String::new(), String::new());
    while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(at) = buf.find("\n\n") {
            let event: String = buf.drain(..at + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                return Ok(text);
            }
            let v: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
            if v.get("error").is_some() {
                return Err(data.to_string());
            }
            text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    Err(format!("the stream ended without [DONE] after {text:?}"))
}

pub fn status_of(reply: &str) -> Option<u16> {
    reply.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}
