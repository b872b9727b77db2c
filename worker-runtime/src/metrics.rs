//! A worker's metrics (names, labels and meaning are listed in docs/metrics.md). Every
//! series carries `worker` (its id) so that the workers of one `tandem up` process,
//! which share a registry, stay apart.

use std::time::Duration;

use crate::actor::Load;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};

pub const RUNNING: &str = "tandem_worker_requests_running";
pub const WAITING: &str = "tandem_worker_requests_waiting";
pub const WAITING_FOR_KV: &str = "tandem_worker_requests_waiting_for_kv";
pub const BLOCKS_USED: &str = "tandem_kv_blocks_used";
pub const BLOCKS_TOTAL: &str = "tandem_kv_blocks_capacity";
pub const PREFIX_QUERIED: &str = "tandem_prefix_cache_queried_tokens_total";
pub const PREFIX_HIT: &str = "tandem_prefix_cache_hit_tokens_total";
pub const PREEMPTIONS: &str = "tandem_preemptions_total";
pub const KV_BYTES: &str = "tandem_kv_transfer_bytes_total";
pub const KV_SESSIONS: &str = "tandem_kv_transfer_sessions_total";
pub const KV_FAILURES: &str = "tandem_kv_transfer_failures_total";
pub const KV_SECONDS: &str = "tandem_kv_transfer_seconds";
pub const KV_FALLBACKS: &str = "tandem_kv_transfer_fallbacks_total";
pub const ROLE_CHANGES: &str = "tandem_worker_role_changes_total";
pub const GUIDE_MASK: &str = "tandem_guide_mask_seconds";
pub const GUIDE_COMPILE: &str = "tandem_guide_compile_seconds";

/// Registers every worker metric's description (idempotent).
pub fn describe() {
    describe_gauge!(RUNNING, "Requests in the worker's running batch (prefilling or decoding).");
    describe_gauge!(WAITING, "Requests queued in the worker's engine, not yet scheduled.");
    describe_gauge!(WAITING_FOR_KV, "Decode-side requests whose blocks are reserved while their KV is in transit.");
    describe_gauge!(BLOCKS_USED, "KV cache blocks held by requests (cached blocks nobody holds are free).");
    describe_gauge!(BLOCKS_TOTAL, "KV cache blocks in the worker's pool.");
    describe_histogram!(
        GUIDE_MASK,
        Unit::Seconds,
        "Constrained decoding: time to compute one token mask (each at its load interval's mean)."
    );
    describe_histogram!(
        GUIDE_COMPILE,
        Unit::Seconds,
        "Constrained decoding: time to compile one request's guide on the worker."
    );
    describe_counter!(PREFIX_QUERIED, Unit::Count, "Prompt tokens looked up in the prefix cache.");
    describe_counter!(PREFIX_HIT, Unit::Count, "Prompt tokens found in the prefix cache (not computed).");
    describe_counter!(PREEMPTIONS, Unit::Count, "Requests preempted (blocks freed, recomputed later).");
    describe_counter!(KV_BYTES, Unit::Bytes, "KV cache bytes moved between workers, by direction (sent, received).");
    describe_counter!(KV_SESSIONS, "KV transfer sessions ended, by direction and outcome (ok, failed).");
    describe_counter!(KV_FAILURES, "Failed KV transfer sessions, by direction and failure kind.");
    describe_histogram!(
        KV_SECONDS,
        Unit::Seconds,
        "A prefill's KV transfer, sender side: from its first layer leaving to the receiver's verdict \
         (it overlaps the prefill's compute; the exposed part is the TTFT stage kv_transfer)."
    );
    describe_counter!(KV_FALLBACKS, "Times a same-host shared-memory transfer could not start and TCP was used.");
    describe_counter!(ROLE_CHANGES, "Role changes of an elastic worker (SetRole), by the roles before and after.");
}

/// An elastic worker changed role: counted, and its gauges under the old role read zero
/// (the new role's series take over; the old ones would otherwise keep their last value).
pub fn role_changed(worker: &str, from: &'static str, to: &'static str) {
    let w = worker.to_string();
    counter!(ROLE_CHANGES, "worker" => w.clone(), "from" => from, "to" => to).increment(1);
    for name in [RUNNING, WAITING, WAITING_FOR_KV, BLOCKS_USED, BLOCKS_TOTAL] {
        gauge!(name, "worker" => w.clone(), "role" => from).set(0.0);
    }
}

/// Publishes the engine's load as gauges and counters.
pub fn set_load(worker: &str, role: &'static str, l: &Load, fallbacks: u64) {
    let w = worker.to_string();
    let st = &l.scheduler;
    gauge!(RUNNING, "worker" => w.clone(), "role" => role).set(st.running.saturating_sub(l.waiting_for_kv) as f64);
    gauge!(WAITING, "worker" => w.clone(), "role" => role).set(st.waiting as f64);
    gauge!(WAITING_FOR_KV, "worker" => w.clone(), "role" => role).set(l.waiting_for_kv as f64);
    gauge!(BLOCKS_USED, "worker" => w.clone(), "role" => role).set(st.blocks_used as f64);
    gauge!(BLOCKS_TOTAL, "worker" => w.clone(), "role" => role).set(st.blocks_total as f64);
    counter!(PREFIX_QUERIED, "worker" => w.clone(), "role" => role).absolute(st.prefix_queried_tokens);
    counter!(PREFIX_HIT, "worker" => w.clone(), "role" => role).absolute(st.prefix_hit_tokens);
    counter!(PREEMPTIONS, "worker" => w.clone(), "role" => role).absolute(st.preemptions);
    counter!(KV_FALLBACKS, "worker" => w.clone()).absolute(fallbacks);
    guide_costs(&w, &l.guides);
}

/// Constrained decoding's costs since the last load report: each mask (and each guide
/// compiled) is recorded at the mean time of those made in the interval, so the
/// histograms' sums and counts are exact and their buckets approximate.
fn guide_costs(worker: &str, now: &tandem_engine::llm_engine::GuideStats) {
    static LAST: std::sync::Mutex<Vec<(String, tandem_engine::llm_engine::GuideStats)>> =
        std::sync::Mutex::new(Vec::new());
    let mut last = LAST.lock().expect("guide stats");
    let before = match last.iter_mut().find(|(w, _)| w == worker) {
        Some((_, s)) => std::mem::replace(s, *now),
        None => {
            last.push((worker.to_string(), *now));
            Default::default()
        }
    };
    let record = |name: &'static str, n: u64, seconds: f64| {
        if n > 0 {
            let h = histogram!(name, "worker" => worker.to_string());
            for _ in 0..n.min(10_000) {
                h.record(seconds / n as f64);
            }
        }
    };
    record(GUIDE_MASK, now.masks.saturating_sub(before.masks), now.mask_seconds - before.mask_seconds);
    record(GUIDE_COMPILE, now.compiled.saturating_sub(before.compiled), now.compile_seconds - before.compile_seconds);
}

/// A KV transfer session ended. `failure`: the transfer error's kind, or None.
pub fn kv_session(worker: &str, direction: &'static str, bytes: u64, failure: Option<&'static str>) {
    let w = worker.to_string();
    if bytes > 0 {
        counter!(KV_BYTES, "worker" => w.clone(), "direction" => direction).increment(bytes);
    }
    let outcome = if failure.is_some() { "failed" } else { "ok" };
    counter!(KV_SESSIONS, "worker" => w.clone(), "direction" => direction, "outcome" => outcome).increment(1);
    if let Some(kind) = failure {
        counter!(KV_FAILURES, "worker" => w, "direction" => direction, "kind" => kind).increment(1);
    }
}

/// Connections the KV receiver closed at accept because a connection cap was reached (a
/// receive-side failure of kind `connection_refused`; the count is the receiver's own).
pub fn kv_connections_refused(worker: &str, total: u64) {
    counter!(KV_FAILURES, "worker" => worker.to_string(), "direction" => "received", "kind" => "connection_refused")
        .absolute(total);
}

pub fn kv_seconds(worker: &str, d: Duration) {
    histogram!(KV_SECONDS, "worker" => worker.to_string()).record(d.as_secs_f64());
}
