//! Cache-aware routing end to end: the router's prefix index fed by real workers' KV
//! events, against real etcd and the real model. Where a request was prefilled is read
//! from the prefill workers' own prefix-cache counters (`prefix_cache_queried_tokens` grows
//! on the worker that looked the prompt up), what it reused from its usage, and what the
//! router predicted from the router's `/metrics`.
//!
//! Each placement test is built so that the load-only policies place differently: a
//! prefix is made to live on `prefill-b` while `least-loaded` sends an idle cluster's
//! requests to the first worker by id, and the order of the requests is one that
//! `round-robin` cannot follow.

mod harness;

use std::time::{Duration, Instant};

use harness::*;
use tandem_proto::tandem::v1 as api;

/// The routers under test.
const POLICY: [&str; 2] = ["--policy", "cache-aware"];
/// What the harness gives every worker (`--lease-ttl 2`).
const LEASE_TTL: Duration = Duration::from_secs(2);

/// Words for the long shared system messages: common ones, so that most are one token.
const WORDS: [&str; 96] = [
    "river", "mountain", "lantern", "copper", "garden", "whisper", "harbor", "meadow", "signal", "orchard", "window",
    "forest", "silver", "engine", "candle", "valley", "bridge", "pocket", "winter", "summer", "market", "letter",
    "ladder", "island", "castle", "thunder", "pepper", "basket", "mirror", "feather", "planet", "rocket", "violin",
    "button", "carpet", "dragon", "jacket", "kettle", "pillow", "saddle", "tunnel", "wagon", "anchor", "barrel",
    "cotton", "desert", "falcon", "glacier", "hammer", "jungle", "kitten", "lemon", "marble", "needle", "oyster",
    "parrot", "quartz", "ribbon", "salmon", "timber", "umbrella", "velvet", "walnut", "yellow", "zebra", "across",
    "before", "careful", "during", "every", "friendly", "gentle", "happy", "inside", "jolly", "kind", "little",
    "modern", "narrow", "often", "quiet", "rapid", "simple", "tender", "under", "very", "wide", "young", "bright",
    "cold", "deep", "early", "fresh", "green", "heavy", "old",
];

/// A system message of about 620 tokens: `topic` first (so that no two topics share even a
/// first block), then sentences of words drawn from `WORDS` by a generator seeded by `seed`.
fn long_system(topic: &str, seed: u64) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut text = format!("{topic} handbook, to be followed closely.");
    for _ in 0..48 {
        let len = 8 + next(6);
        let words: Vec<&str> = (0..len).map(|_| WORDS[next(WORDS.len() as u64) as usize]).collect();
        let sentence = words.join(" ");
        let mut chars = sentence.chars();
        let first = chars.next().map(|c| c.to_ascii_uppercase()).unwrap_or(' ');
        text += &format!(" {first}{}.", chars.as_str());
    }
    text
}

/// A greedy chat request of 2 tokens: `system`, then `question` from the user.
fn ask(system: &str, question: &str) -> api::GenerateRequest {
    let mut r = chat(question, 2);
    if let Some(api::generate_request::Input::Messages(m)) = r.input.as_mut() {
        m.messages.insert(0, api::ChatMessage { role: "system".into(), content: system.into(), ..Default::default() });
    }
    r
}

/// Streams `req` through the router; its usage.
async fn send(
    client: &mut api::generate_client::GenerateClient<tonic::transport::Channel>,
    req: api::GenerateRequest,
) -> api::Usage {
    let got = stream(client, req).await.unwrap_or_else(|e| panic!("the request failed: {e:?}"));
    let u = got.usage.expect("usage on the last chunk");
    // The shared system message is what the tests are about: it must be long.
    assert!((450..=900).contains(&u.prompt_tokens), "a prompt of {} tokens, want about 620", u.prompt_tokens);
    u
}

/// A worker's prefix-cache counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cache {
    queried: u64,
    hit: u64,
}

async fn caches(addrs: &[&str]) -> Vec<Cache> {
    let mut out = Vec::new();
    for a in addrs {
        let s = stats(a).await;
        out.push(Cache { queried: s.prefix_cache_queried_tokens, hit: s.prefix_cache_hit_tokens });
    }
    out
}

/// The workers that looked a prompt up between `before` and `after`: where it was prefilled.
fn prefilled_on(before: &[Cache], after: &[Cache]) -> Vec<usize> {
    (0..before.len()).filter(|&i| after[i].queried > before[i].queried).collect()
}

/// One scrape of the router's `/metrics`.
struct Metrics(String);

impl Metrics {
    fn read(http: &str) -> Metrics {
        Metrics(http_get(http, "/metrics"))
    }

    /// The sum of the series of `name` that carry every label of `labels`; `None` when
    /// there is none.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut sum = None;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let tags: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
            if metric != name || !labels.iter().all(|(k, v)| tags.contains(&format!("{k}=\"{v}\"").as_str())) {
                continue;
            }
            let v: f64 = value.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"));
            sum = Some(sum.unwrap_or(0.0) + v);
        }
        sum
    }

    /// As `get`, 0 for a counter never incremented.
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

const BLOCKS: &str = "tandem_router_index_blocks";
const MISMATCH: &str = "tandem_router_index_mismatch";
const HITS: &str = "tandem_router_cache_predicted_hits_total";
const MISSED: &str = "tandem_router_cache_predicted_hits_missed_total";
/// The prefill stage's predictions (the decode stage predicts the reservation's reuse too).
const PREFILL: &[(&str, &str)] = &[("stage", "prefill")];
const REUSED: &str = "tandem_router_cache_reused_tokens_total";

/// Polls the router's `/metrics` until `ok` holds for metric `name` with `labels` (`None`:
/// no such series); how long that took.
async fn wait_metric(
    http: &str,
    name: &str,
    labels: &[(&str, &str)],
    within: Duration,
    ok: impl Fn(Option<f64>) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let m = Metrics::read(http);
        let v = m.get(name, labels);
        if ok(v) {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{name}{labels:?} never held within {within:?}; last {v:?}:\n{}", m.0);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A router started with `POLICY`: the process, its gRPC and its HTTP address.
struct Router {
    proc: Proc,
    grpc: String,
    http: String,
}

impl Router {
    fn start(etcd: &Etcd, cluster: &str, extra: &[&str]) -> Router {
        let flags: Vec<&str> = POLICY.iter().chain(extra).copied().collect();
        let (proc, grpc) = start_router(etcd, cluster, &flags);
        let http = proc.addr_after("tandem: router", "http");
        Router { proc, grpc, http }
    }

    /// Waits until the router has each worker in its view, its `n`th time.
    fn joined(&self, ids: &[&str], n: usize) {
        for id in ids {
            let end = Instant::now() + Duration::from_secs(30);
            let times =
                || self.proc.output().iter().filter(|l| is_event(l, "worker joined", &[("worker", id)])).count();
            while times() < n {
                assert!(Instant::now() < end, "{id} did not join {n} time(s):\n{}", self.proc.output().join("\n"));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Waits until the router has read each worker's opening snapshot (its block gauge exists).
    async fn indexed(&self, ids: &[&str]) {
        for id in ids {
            wait_metric(&self.http, BLOCKS, &[("worker", id)], Duration::from_secs(15), |v| v.is_some()).await;
        }
    }

    /// Waits until the index says `id` holds blocks: its KV events for a prefill arrived.
    async fn holds(&self, id: &str) {
        wait_metric(&self.http, BLOCKS, &[("worker", id)], Duration::from_secs(15), |v| v.is_some_and(|n| n > 0.0))
            .await;
    }
}

/// A worker of `role` (`prefill`, `decode` or `both`) joined to `cluster`.
fn worker(etcd: &Etcd, cluster: &str, role: &str, id: &str, extra: &[&str]) -> (Proc, String) {
    match role {
        "both" => {
            let flags: Vec<&str> = ["--role", "both"].iter().chain(extra).copied().collect();
            start_worker(etcd, cluster, "decode", id, &flags)
        }
        r => start_worker(etcd, cluster, r, id, extra),
    }
}

#[test]
fn each_group_sharing_a_long_prefix_is_prefilled_where_its_prefix_is_cached() {
    let _one = serial();
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let _decode =
        [worker(&etcd, &cluster, "decode", "decode-a", &[]), worker(&etcd, &cluster, "decode", "decode-b", &[])];
    let (_pb, pb_addr) = worker(&etcd, &cluster, "prefill", "prefill-b", &[]);
    let r = Router::start(&etcd, &cluster, &[]);
    r.joined(&["decode-a", "decode-b", "prefill-b"], 1);
    let (sys_a, sys_b) = (long_system("Astronomy", 1), long_system("Cooking", 2));
    rt().block_on(async {
        let mut client = client(&r.grpc).await;
        // Group B's prefix is computed on prefill-b while it is the only prefill worker;
        // least-loaded would send every later request of an idle cluster to prefill-a.
        send(&mut client, ask(&sys_b, PROMPTS[0])).await;
        r.holds("prefill-b").await;
        let (_pa, pa_addr) = worker(&etcd, &cluster, "prefill", "prefill-a", &[]);
        r.joined(&["prefill-a"], 1);
        r.indexed(&["prefill-a"]).await;
        let addrs = [pa_addr.as_str(), pb_addr.as_str()];
        let before = caches(&addrs).await;
        send(&mut client, ask(&sys_a, PROMPTS[0])).await;
        let after = caches(&addrs).await;
        // No worker holds group A's prefix and both are idle: the first by id takes it.
        assert_eq!(prefilled_on(&before, &after), [0], "group A's warm-up: {before:?} -> {after:?}");
        r.holds("prefill-a").await;

        let m0 = Metrics::read(&r.http);
        // One at a time, in an order round-robin cannot follow.
        let groups = [0, 0, 1, 0, 1, 1];
        for (i, &g) in groups.iter().enumerate() {
            let sys = [&sys_a, &sys_b][g];
            let before = caches(&addrs).await;
            let u = send(&mut client, ask(sys, PROMPTS[i + 1])).await;
            let after = caches(&addrs).await;
            let on = prefilled_on(&before, &after);
            assert_eq!(on, [g], "request {i} of group {g} was prefilled on {on:?}: {before:?} -> {after:?}");
            assert!(after[g].hit > before[g].hit, "request {i}: no prefix hit on its worker: {after:?}");
            assert!(
                u.cached_tokens * 2 >= u.prompt_tokens,
                "request {i} of group {g}: {} of {} prompt tokens cached",
                u.cached_tokens,
                u.prompt_tokens
            );
        }
        let m1 = Metrics::read(&r.http);
        let hits = m1.count(HITS, PREFILL) - m0.count(HITS, PREFILL);
        let missed = m1.count(MISSED, PREFILL) - m0.count(MISSED, PREFILL);
        assert_eq!((hits, missed), (groups.len() as f64, 0.0), "predicted hits, of them missed");
    });
}

#[test]
fn a_new_router_sends_its_first_request_to_the_worker_holding_the_prefix() {
    let _one = serial();
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let _decode = worker(&etcd, &cluster, "decode", "decode-0", &[]);
    let (_pb, pb_addr) = worker(&etcd, &cluster, "prefill", "prefill-b", &[]);
    let mut old = Router::start(&etcd, &cluster, &[]);
    old.joined(&["decode-0", "prefill-b"], 1);
    let system = long_system("Gardening", 3);
    rt().block_on(async {
        // The prefix is cached on prefill-b alone (the only prefill worker then).
        let warm = send(&mut client(&old.grpc).await, ask(&system, PROMPTS[0])).await;
        assert_eq!(warm.cached_tokens, 0, "nothing was cached before");
        old.holds("prefill-b").await;
    });
    let (_pa, pa_addr) = worker(&etcd, &cluster, "prefill", "prefill-a", &[]);
    old.joined(&["prefill-a"], 1);
    old.proc.signal("KILL");
    old.proc.wait_exit(Duration::from_secs(10));

    let r = Router::start(&etcd, &cluster, &[]);
    r.joined(&["decode-0", "prefill-a", "prefill-b"], 1);
    rt().block_on(async {
        r.indexed(&["decode-0", "prefill-a"]).await;
        r.holds("prefill-b").await;
        let addrs = [pa_addr.as_str(), pb_addr.as_str()];
        let before = caches(&addrs).await;
        let u = send(&mut client(&r.grpc).await, ask(&system, PROMPTS[1])).await;
        let after = caches(&addrs).await;
        assert_eq!(prefilled_on(&before, &after), [1], "prefilled on prefill-b: {before:?} -> {after:?}");
        assert!(after[1].hit > before[1].hit, "a prefix hit on prefill-b: {before:?} -> {after:?}");
        assert!(u.cached_tokens * 2 >= u.prompt_tokens, "{} of {} cached", u.cached_tokens, u.prompt_tokens);
        let m = Metrics::read(&r.http);
        assert_eq!((m.count(HITS, PREFILL), m.count(MISSED, PREFILL)), (1.0, 0.0), "predicted hits, of them missed");
    });
}

#[test]
fn a_killed_worker_leaves_the_index_and_comes_back_empty() {
    let _one = serial();
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let ids = ["prefill-a", "prefill-b"];
    let _decode = worker(&etcd, &cluster, "decode", "decode-0", &[]);
    let mut prefill =
        [worker(&etcd, &cluster, "prefill", ids[0], &[]), worker(&etcd, &cluster, "prefill", ids[1], &[])];
    let r = Router::start(&etcd, &cluster, &[]);
    r.joined(&["decode-0", ids[0], ids[1]], 1);
    let system = long_system("Sailing", 4);
    rt().block_on(async {
        let mut client = client(&r.grpc).await;
        r.indexed(&ids).await;
        let addrs = [prefill[0].1.clone(), prefill[1].1.clone()];
        let before = caches(&[&addrs[0], &addrs[1]]).await;
        send(&mut client, ask(&system, PROMPTS[0])).await;
        let after = caches(&[&addrs[0], &addrs[1]]).await;
        let on = prefilled_on(&before, &after);
        assert_eq!(on.len(), 1, "one prefill worker prefilled: {before:?} -> {after:?}");
        let x = on[0];
        r.holds(ids[x]).await;

        prefill[x].0.kill();
        let gone = wait_metric(&r.http, BLOCKS, &[("worker", ids[x])], LEASE_TTL, |v| v.is_none_or(|n| n == 0.0)).await;
        eprintln!("{}'s index entries went {gone:?} after its SIGKILL", ids[x]);
        r.proc.wait_event("worker left", &[("worker", ids[x])], Duration::from_secs(10));

        // The same id, a new process: its cache is empty.
        prefill[x] = worker(&etcd, &cluster, "prefill", ids[x], &[]);
        r.joined(&[ids[x]], 2);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let addrs = [prefill[0].1.clone(), prefill[1].1.clone()];
        let (m0, before) = (Metrics::read(&r.http), caches(&[&addrs[0], &addrs[1]]).await);
        let u = send(&mut client, ask(&system, PROMPTS[1])).await;
        let (m1, after) = (Metrics::read(&r.http), caches(&[&addrs[0], &addrs[1]]).await);
        let on = prefilled_on(&before, &after);
        assert_eq!(on.len(), 1, "one prefill worker prefilled: {before:?} -> {after:?}");
        let (hits, missed) =
            (m1.count(HITS, PREFILL) - m0.count(HITS, PREFILL), m1.count(MISSED, PREFILL) - m0.count(MISSED, PREFILL));
        // Neither worker holds the prefix now: no hit may be predicted, wherever it went.
        assert_eq!((hits, missed), (0.0, 0.0), "predicted hits, of them missed (went to {})", ids[on[0]]);
        assert_eq!(u.cached_tokens, 0, "went to {}, which cannot hold it", ids[on[0]]);
        let z = on[0];
        assert_eq!(after[z].hit, before[z].hit, "{} reused nothing: {before:?} -> {after:?}", ids[z]);

        // What that worker computed reaches the index from its live events: the next one hits.
        r.holds(ids[z]).await;
        let m0 = Metrics::read(&r.http);
        let u = send(&mut client, ask(&system, PROMPTS[2])).await;
        let m1 = Metrics::read(&r.http);
        assert!(u.cached_tokens * 2 >= u.prompt_tokens, "{} of {} cached", u.cached_tokens, u.prompt_tokens);
        let (hits, missed) =
            (m1.count(HITS, PREFILL) - m0.count(HITS, PREFILL), m1.count(MISSED, PREFILL) - m0.count(MISSED, PREFILL));
        assert_eq!((hits, missed), (1.0, 0.0), "predicted hits, of them missed, once {} holds it", ids[z]);
    });
}

#[test]
fn a_worker_with_another_block_size_is_flagged_and_served_by_load() {
    let _one = serial();
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let (_wide, wide_addr) = worker(&etcd, &cluster, "both", "both-32", &["--block-size", "32"]);
    let r = Router::start(&etcd, &cluster, &[]);
    r.joined(&["both-32"], 1);
    let system = long_system("Pottery", 5);
    rt().block_on(async {
        wait_metric(&r.http, MISMATCH, &[("worker", "both-32")], Duration::from_secs(10), |v| v == Some(1.0)).await;
        let mut client = client(&r.grpc).await;
        let before = caches(&[&wide_addr]).await;
        send(&mut client, ask(&system, PROMPTS[0])).await;
        let u = send(&mut client, ask(&system, PROMPTS[1])).await;
        let after = caches(&[&wide_addr]).await;
        assert!(after[0].queried > before[0].queried, "both-32 served the requests: {before:?} -> {after:?}");
        // Its own cache works; the router just cannot name its blocks.
        assert!(u.cached_tokens * 2 >= u.prompt_tokens, "{} of {} cached", u.cached_tokens, u.prompt_tokens);
        let m = Metrics::read(&r.http);
        assert_eq!(m.get(BLOCKS, &[("worker", "both-32")]), None, "its KV events are not followed");
        assert!(m.count(REUSED, &[("stage", "local")]) > 0.0, "the reuse it reported is counted");
        assert_eq!(m.count(HITS, &[]), 0.0, "no hit is predicted on a worker whose blocks the router cannot name");

        let (_plain, _) = worker(&etcd, &cluster, "both", "both-16", &[]);
        r.joined(&["both-16"], 1);
        wait_metric(&r.http, MISMATCH, &[("worker", "both-16")], Duration::from_secs(10), |v| v == Some(0.0)).await;
        let m = Metrics::read(&r.http);
        assert_eq!(m.get(MISMATCH, &[("worker", "both-32")]), Some(1.0));
    });
}

#[test]
fn siblings_of_a_new_prefix_sent_together_are_prefilled_on_one_worker() {
    let _one = serial();
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let ids = ["prefill-a", "prefill-b", "decode-a", "decode-b"];
    let workers: Vec<(Proc, String)> =
        ids.iter().map(|id| worker(&etcd, &cluster, id.split_once('-').expect("role-name").0, id, &[])).collect();
    let addrs = [workers[0].1.as_str(), workers[1].1.as_str()];
    let r = Router::start(&etcd, &cluster, &[]);
    r.joined(&ids, 1);
    let system = long_system("Beekeeping", 6);
    rt().block_on(async {
        let client = client(&r.grpc).await;
        r.indexed(&ids).await;
        // Every worker's load has been polled.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let (m0, before) = (Metrics::read(&r.http), caches(&addrs).await);
        let tasks: Vec<_> = PROMPTS
            .iter()
            .map(|q| {
                let (mut cl, req) = (client.clone(), ask(&system, q));
                tokio::spawn(async move { send(&mut cl, req).await })
            })
            .collect();
        let mut cached = Vec::new();
        for t in tasks {
            cached.push(t.await.unwrap().cached_tokens);
        }
        let (m1, after) = (Metrics::read(&r.http), caches(&addrs).await);
        let hits = m1.count(HITS, PREFILL) - m0.count(HITS, PREFILL);
        let missed = m1.count(MISSED, PREFILL) - m0.count(MISSED, PREFILL);
        eprintln!(
            "siblings: cached tokens {cached:?}; predicted hits {hits}, missed {missed}; {before:?} -> {after:?}"
        );
        let on = prefilled_on(&before, &after);
        assert_eq!(on.len(), 1, "all 8 on one prefill worker: {before:?} -> {after:?}");
        let other = 1 - on[0];
        assert_eq!(after[other], before[other], "{} was not touched", ids[other]);
        // The engine starts one of them alone (its first step's 512 tokens all go to that
        // prompt); each of the others finds at least that first chunk cached.
        let hit = cached.iter().filter(|&&c| c > 0).count();
        assert!(hit >= 7, "{hit} of 8 reused the prefix: {cached:?}");
        // The first routed found nothing; the 7 after it were predicted to hit its pending
        // blocks. One of them may reach the engine before it and compute the prefix itself:
        // a predicted hit missed.
        assert_eq!(hits, 7.0, "predicted hits");
        assert!(missed <= 1.0, "{missed} predicted hits missed");
    });
}
