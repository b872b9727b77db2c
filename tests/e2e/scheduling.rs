//! Scheduling for people (issue 21), against real processes: a router, a prefill and a
//! decode worker on etcd, driven over real TCP by gRPC and HTTP clients.
//!
//! - `fair`: one tenant floods a decode worker that runs two sequences at a time; a second
//!   tenant's requests, sent after the flood, finish before most of it. Workers report both
//!   tenants' service, and the router counts their tokens.
//! - `priority`: an urgent request sent after four lax ones finishes before most of them.
//! - SLO admission: a request whose first token is predicted after its objective is refused
//!   (RESOURCE_EXHAUSTED with `retry-after`; HTTP 429 with `Retry-After`), one with a loose
//!   objective and one with none are served, and a malformed header is a 400.
//!
//! Orders and counts are asserted, never times.

mod harness;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::*;
use tandem_proto::tandem::v1 as api;

/// A prompt whose greedy answer does not end soon (`ignore_eos` makes every answer as long
/// as asked).
const COUNT: &str = "Count from one to one thousand, one number per line.";

struct Setup {
    _etcd: Etcd,
    router: Proc,
    grpc: String,
    http: String,
    decode: String,
    prefill: String,
    workers: Vec<Proc>,
}

impl Setup {
    fn start(worker_flags: &[&str], decode_flags: &[&str], router_flags: &[&str]) -> Setup {
        let etcd = Etcd::start();
        let cluster = format!("e2e{}", free_port());
        let (p, prefill) = start_worker(&etcd, &cluster, "prefill", "prefill-0", worker_flags);
        let mut d_flags: Vec<&str> = worker_flags.to_vec();
        d_flags.extend_from_slice(decode_flags);
        let (d, decode) = start_worker(&etcd, &cluster, "decode", "decode-0", &d_flags);
        let (router, grpc) = start_router(&etcd, &cluster, router_flags);
        for id in ["prefill-0", "decode-0"] {
            router.wait_event("worker joined", &[("worker", id)], Duration::from_secs(30));
        }
        let http = router.addr_after("tandem: router", "http");
        Setup { _etcd: etcd, router, grpc, http, decode, prefill, workers: vec![p, d] }
    }

    fn no_panics(&self) {
        for p in std::iter::once(&self.router).chain(self.workers.iter()) {
            let out = p.output();
            assert!(!out.iter().any(|l| l.contains("panicked")), "{} panicked:\n{}", p.name, out.join("\n"));
        }
    }

    async fn assert_idle(&self) {
        assert_idle(&wait_idle(&[self.prefill.clone(), self.decode.clone()]).await);
    }
}

fn long(max_tokens: u32) -> api::GenerateRequest {
    let mut r = chat(COUNT, max_tokens);
    r.sampling.as_mut().unwrap().ignore_eos = true;
    r
}

fn authed<T>(req: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(req);
    if let Some(k) = key {
        r.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    r
}

/// Sends `req` as `key`, reads its stream to the end, then notes `label` in `done`.
fn spawn_request(
    grpc: &str,
    key: Option<&'static str>,
    req: api::GenerateRequest,
    label: String,
    done: &Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<usize> {
    let (grpc, done) = (grpc.to_string(), done.clone());
    tokio::spawn(async move {
        let mut c = client(&grpc).await;
        let mut s = c.generate_stream(authed(req, key)).await.expect("admitted").into_inner();
        let mut tokens = 0;
        while let Some(m) = s.message().await.expect("stream") {
            tokens += m.token_ids.len();
        }
        done.lock().unwrap().push(label);
        tokens
    })
}

/// Waits until the decode worker holds at least `n` requests (running, or waiting for KV).
async fn wait_held(decode: &str, n: u32) {
    for _ in 0..600 {
        let s = stats(decode).await;
        if s.running + s.waiting_for_kv >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the decode worker never held {n} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_fair_a_light_tenant_is_served_while_another_floods() {
    let _one = serial();
    let fair = ["--scheduling-policy", "fair"];
    let c = Setup::start(
        &fair,
        &["--max-seqs", "2", "--kv-blocks", "2048"],
        &["--scheduling-policy", "fair", "--api-key", "flood:sk-flood", "--api-key", "light:sk-light"],
    );
    let done = Arc::new(Mutex::new(Vec::new()));
    const FLOOD: usize = 12;
    const TOKENS: u32 = 24;
    let mut tasks = Vec::new();
    for i in 0..FLOOD {
        tasks.push(spawn_request(&c.grpc, Some("sk-flood"), long(TOKENS), format!("flood-{i}"), &done));
    }
    // The whole flood is on the decode worker (two run, the rest wait inside it) before the
    // light tenant arrives.
    wait_held(&c.decode, FLOOD as u32 - 1).await;
    for i in 0..3 {
        tasks.push(spawn_request(&c.grpc, Some("sk-light"), long(TOKENS), format!("light-{i}"), &done));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), TOKENS as usize);
    }
    let order = done.lock().unwrap().clone();
    println!("completion order: {order:?}");
    let last_light = order.iter().rposition(|l| l.starts_with("light")).unwrap();
    let flood_before = order[..last_light].iter().filter(|l| l.starts_with("flood")).count();
    // First come, first served would finish the whole flood first (12 before the last light).
    assert!(flood_before <= FLOOD / 2, "the light tenant waited for {flood_before} flood requests: {order:?}");

    // The workers count both tenants' service: the decode worker more of the flood's.
    let d = stats(&c.decode).await;
    let service = |s: &tandem_proto::tandem::worker::v1::StatsResponse, t: &str| {
        s.tenant_service.iter().find(|x| x.tenant == t).map_or(0.0, |x| x.service)
    };
    assert!(service(&d, "flood") > service(&d, "light") * 3.0, "{:?}", d.tenant_service);
    assert!(service(&d, "light") > 0.0, "{:?}", d.tenant_service);
    let p = stats(&c.prefill).await;
    assert!(service(&p, "flood") > 0.0 && service(&p, "light") > 0.0, "{:?}", p.tenant_service);
    // The router's per-tenant token counts: exactly what was generated.
    let scrape = http_get(&c.http, "/metrics");
    let light = metric(&scrape, "tandem_tenant_tokens_total", &[("tenant", "light"), ("stage", "decode")]);
    let flood = metric(&scrape, "tandem_tenant_tokens_total", &[("tenant", "flood"), ("stage", "decode")]);
    assert_eq!((light, flood), (3.0 * TOKENS as f64, FLOOD as f64 * TOKENS as f64));
    assert!(metric(&scrape, "tandem_tenant_queue_seconds_count", &[("tenant", "light")]) == 3.0, "{scrape}");
    c.assert_idle().await;
    c.no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_priority_an_urgent_request_goes_before_lax_ones_sent_earlier() {
    let _one = serial();
    let c =
        Setup::start(&["--scheduling-policy", "priority"], &["--max-seqs", "1"], &["--scheduling-policy", "priority"]);
    let done = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mut r = long(32);
        r.priority = 5;
        tasks.push(spawn_request(&c.grpc, None, r, format!("lax-{i}"), &done));
    }
    wait_held(&c.decode, 4).await;
    let mut urgent = long(32);
    urgent.priority = -5;
    tasks.push(spawn_request(&c.grpc, None, urgent, "urgent".into(), &done));
    for t in tasks {
        t.await.unwrap();
    }
    let order = done.lock().unwrap().clone();
    println!("completion order: {order:?}");
    let at = order.iter().position(|l| l == "urgent").unwrap();
    // One sequence at a time: the lax request decoding when it came may finish first.
    assert!(at <= 1, "{order:?}");
    c.assert_idle().await;
    c.no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_predicted_to_miss_its_ttft_objective_is_refused_and_others_are_served() {
    let _one = serial();
    let c = Setup::start(&[], &[], &[]);
    let mut g = client(&c.grpc).await;
    // Before any prefill is measured nothing is predicted: even a 1 ms objective is admitted.
    let mut first = chat("Say hello.", 4);
    first.slo_ttft_ms = Some(1);
    g.generate(first).await.expect("nothing measured yet: admitted");

    // Now the prefill rate is known: a 1 ms objective cannot be met by any prompt.
    let mut tight = chat("Say hello.", 4);
    tight.slo_ttft_ms = Some(1);
    let st = g.generate(tight).await.expect_err("refused");
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
    let retry: u64 = st.metadata().get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(st.message().contains("TTFT objective of 1 ms"), "{}", st.message());
    // A loose objective, and none at all, are served.
    let mut loose = chat("Say hello.", 4);
    loose.slo_ttft_ms = Some(600_000);
    g.generate(loose).await.expect("a loose objective is met");
    g.generate(chat("Say hello.", 4)).await.expect("no objective: never refused by this rule");
    // Out of range: the client's error.
    let mut bad = chat("Say hello.", 4);
    bad.slo_ttft_ms = Some(0);
    assert_eq!(g.generate(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    // HTTP: the x-slo-ttft-ms header.
    let web = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", c.http);
    let body =
        serde_json::json!({"model": "", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4});
    let r = web.post(&url).header("x-slo-ttft-ms", "1").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    let r = web.post(&url).header("x-slo-ttft-ms", "soon").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = web.post(&url).header("x-slo-ttft-ms", "600000").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let scrape = http_get(&c.http, "/metrics");
    assert_eq!(metric(&scrape, "tandem_router_admission_refusals_total", &[("reason", "slo_ttft")]), 2.0);
    // Predictions were made and compared with what happened.
    assert!(metric(&scrape, "tandem_ttft_prediction_error_seconds_count", &[]) >= 3.0, "{scrape}");
    c.assert_idle().await;
    c.no_panics();
}
