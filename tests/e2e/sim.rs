//! `tandem profile` and `tandem sim` against a tiny real run. The simulator, calibrated by
//! `tandem profile --quick` on this machine, is given the arrivals a real cluster (two
//! prefill workers and one decode worker, real etcd, the real model) was sent, one at a
//! time: it must place every request on the prefill worker the real router chose (read
//! from the router's own `placed` events), tokenize the prompts alike and find the same
//! prefix-cache hits.

mod harness;

use std::time::Duration;

use harness::*;

/// The arrivals: two groups with their own long context, two users each, one request at a
/// time, so the router's choices follow the prefix cache and its tie-breaks alone.
const WORKLOAD: &[&str] = &[
    "--workload",
    "shared-contexts",
    "--groups",
    "2",
    "--users",
    "2",
    "--context-tokens",
    "120",
    "--query-tokens",
    "12",
    "--requests",
    "8",
    "--max-tokens",
    "2",
    "--seed",
    "3",
    "--concurrency",
    "1",
];

fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[test]
fn the_simulator_places_the_same_arrivals_where_the_real_router_does() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let costs = dir.path().join("costs.json");
    let out = tandem(&["profile", "--quick", "--threads", "1", "-o", costs.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "tandem profile: {}", String::from_utf8_lossy(&out.stderr));
    let profile: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&costs).unwrap()).unwrap();
    assert!(profile["step"]["token_ms"].as_f64().unwrap() > 0.0, "{profile}");
    assert!(profile["links"]["shm"]["gb_per_s"].as_f64().unwrap() > 0.0, "{profile}");

    // The real run.
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let _workers = [
        start_worker(&etcd, &cluster, "prefill", "prefill-000", &[]),
        start_worker(&etcd, &cluster, "prefill", "prefill-001", &[]),
        start_worker(&etcd, &cluster, "decode", "decode-000", &[]),
    ];
    let args = [
        "router",
        "--etcd",
        &etcd.url,
        "--cluster",
        &cluster,
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ];
    let mut cmd = tandem(&args);
    cmd.env("RUST_LOG", "info,tandem_router::pick=debug");
    let router = Proc::spawn("router", cmd);
    let grpc = router.addr_after("tandem: router", "grpc");
    for id in ["prefill-000", "prefill-001", "decode-000"] {
        router.wait_event("worker joined", &[("worker", id)], Duration::from_secs(30));
    }
    let mut bench = vec!["bench", "serve", "--target", grpc.as_str(), "--api", "grpc", "--json", "--timeout", "300"];
    bench.extend_from_slice(WORKLOAD);
    let out = tandem_serving(&bench, &[]).output().unwrap();
    assert!(out.status.success(), "bench serve: {}", String::from_utf8_lossy(&out.stderr));
    let real = json_lines(&out.stdout).pop().expect("the run's JSON");
    assert_eq!(real["failed"], 0, "{real}");
    let placed: Vec<String> = router
        .stderr()
        .iter()
        .filter(|l| is_event(l, "placed", &[("stage", "\"prefill\"")]))
        .map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("worker=")).expect("a worker").to_string())
        .collect();
    assert_eq!(placed.len(), 8, "{:?}", router.stderr());

    // The same arrivals, simulated.
    let mut sim = vec!["sim", "--costs", costs.to_str().unwrap(), "--prefill", "2", "--decode", "1", "--link", "shm"];
    sim.extend_from_slice(&["--routes", "--json"]);
    sim.extend_from_slice(WORKLOAD);
    let out = tandem(&sim).output().unwrap();
    assert!(out.status.success(), "tandem sim: {}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out.stdout);
    let (routes, run) = lines.split_at(lines.len() - 1);
    let simulated: Vec<String> =
        routes.iter().map(|r| r["prefill"].as_str().expect("a prefill worker").to_string()).collect();
    assert_eq!(simulated, placed, "simulated placements against the router's");
    // Both workers served: the choices were made by the cache, not by a single candidate.
    assert!(placed.iter().any(|w| w == "prefill-000") && placed.iter().any(|w| w == "prefill-001"), "{placed:?}");
    let run = &run[0];
    assert_eq!(run["failed"], 0, "{run}");
    for k in ["requests", "prompt_tokens", "cached_tokens"] {
        assert_eq!(run[k], real[k], "{k}: simulated {run}\nreal {real}");
    }
    assert!(real["cached_tokens"].as_u64().unwrap() > 0, "{real}");
}
