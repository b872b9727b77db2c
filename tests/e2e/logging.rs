//! Logs a person (and a log pipeline) can read: events of the library crates, sent through
//! `tracing`, reach the `tandem` process's stderr, as text lines by default and as one JSON
//! object per line with `--log-format json`. The event here is a warning of
//! `tandem-cluster`'s etcd registration: a worker's lease keep-alive failing when etcd dies.

mod harness;

use std::time::{Duration, Instant};

use harness::*;

const KEEP_ALIVE_FAILED: &str = "lease keep-alive failed";

/// Two prefill workers registered in a real etcd, one logging text and one JSON; etcd is
/// SIGKILLed, and each worker's stderr gets the WARN line of its failed keep-alive.
#[test]
fn an_etcd_warning_of_the_cluster_crate_reaches_stderr_as_text_and_as_json() {
    let _one = serial();
    let mut etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let (text, _) = start_worker(&etcd, &cluster, "prefill", "prefill-text", &[]);
    let (json, _) = start_worker(&etcd, &cluster, "prefill", "prefill-json", &["--log-format", "json"]);
    // Both hold a lease (their keys are in etcd), so both are renewing one when etcd dies.
    let prefix = format!("/tandem/{cluster}/workers/");
    let end = Instant::now() + Duration::from_secs(30);
    while etcd.keys(&prefix).len() < 2 {
        assert!(Instant::now() < end, "the workers did not register: {:?}", etcd.keys(&prefix));
        std::thread::sleep(Duration::from_millis(50));
    }
    etcd.kill();

    // TIME  WARN tandem_cluster::etcd::registration: lease keep-alive failed; ... worker=prefill-text ...
    let line = text.wait_stderr_line(KEEP_ALIVE_FAILED, Duration::from_secs(30));
    eprintln!("text: {line}");
    assert!(is_event(&line, KEEP_ALIVE_FAILED, &[("worker", "prefill-text")]), "{line}");
    let words: Vec<&str> = line.split_whitespace().collect();
    let [time, level, target, ..] = words[..] else { panic!("time, level, target, message: {line}") };
    assert!(time.contains('T') && time.ends_with('Z'), "an RFC 3339 UTC time first: {line}");
    assert_eq!(level, "WARN", "{line}");
    assert!(target.starts_with("tandem_cluster::"), "from the cluster crate: {line}");
    assert!(!line.contains('\x1b'), "no colours when stderr is not a terminal: {line:?}");

    // {"timestamp":"…","level":"WARN","message":"lease keep-alive failed; …","worker":"prefill-json",…}
    let line = json.wait_stderr_line(KEEP_ALIVE_FAILED, Duration::from_secs(30));
    eprintln!("json: {line}");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["level"], "WARN", "{line}");
    assert!(v["message"].as_str().is_some_and(|m| m.starts_with(KEEP_ALIVE_FAILED)), "{line}");
    assert_eq!(v["worker"], "prefill-json", "{line}");
    assert!(v["target"].as_str().is_some_and(|t| t.starts_with("tandem_cluster::")), "{line}");
    assert!(v["timestamp"].is_string(), "{line}");
    for l in json.stderr() {
        let v: serde_json::Value =
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("every stderr line is JSON: {e}: {l}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
    }
    // Stdout keeps the lines scripts parse, in text.
    assert!(json.output().iter().any(|l| l == "tandem: ready"), "{:?}", json.output());
}
