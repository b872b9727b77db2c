//! The event loop alone: costs applied as given, runs that repeat under a seed, and every
//! request ending exactly once with nothing left held.

use std::collections::BTreeMap;
use std::time::Duration;

use tandem_engine::scheduler::SchedulerConfig;
use tandem_router::placement::{Mode, PlacementConfig};

use super::*;
use crate::sim::cost::{Costs, Link, StepCost};

fn costs() -> Costs {
    Costs {
        source: "test".into(),
        step: StepCost { base_ms: 10.0, token_ms: 1.0, seq_ms: 0.0, attn_ms: 0.0, prompt_ms: 0.0 },
        kv_bytes_per_token: 1000.0,
        layers: 10,
        links: BTreeMap::from([("test".to_string(), Link { latency_ms: 0.5, gb_per_s: 1.0 })]),
        router_ms: 2.0,
        rpc_ms: 1.0,
        kv_blocks: 256,
        block_size: 16,
        points: Vec::new(),
    }
}

fn config(prefill: usize, decode: usize, both: usize) -> Config {
    Config {
        prefill,
        decode,
        both,
        policy: "cache-aware".into(),
        cache_weight: 2.0,
        placement: PlacementConfig { mode: Mode::Remote, ..PlacementConfig::default() },
        prefill_sched: SchedulerConfig::default(),
        decode_sched: SchedulerConfig::default(),
        prefix_caching: true,
        link: Link { latency_ms: 0.5, gb_per_s: 1.0 },
        kv_wait: Duration::from_secs(30),
        max_inflight: 512,
        slo_admission_ttft: None,
        horizon: None,
        cores: None,
        concurrency: None,
    }
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    (0..n as u64).map(|i| 200 + ((seed * 7_919 + i * 104_729) % 30_000) as u32).collect()
}

fn arrival(at: f64, prompt: Vec<u32>, output_len: u32) -> Arrival {
    Arrival { at, prompt, output_len, tenant: None, phase: None }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

#[test]
fn a_lone_request_takes_what_the_cost_model_says() {
    let report = World::new(config(1, 1, 0), costs()).unwrap().run(vec![arrival(0.0, tokens(100, 1), 5)]);
    let o = &report.outcomes[0];
    assert!(o.ok, "{o:?}");
    // A hop to the router (1 ms) and its 2 ms; the reservation's round trip and the prefill
    // call (3 hops); one prefill step of 100 tokens (10 + 100 ms); the KV (100 tokens of 1000
    // bytes at 1 GB/s, 0.5 ms latency) streams behind the prefill, so only the last layer's
    // tenth is left: 0.51 ms. The idle decode worker takes it and the first token goes out
    // through the router (2 hops).
    let kv = 0.006 + 0.110 + 0.000_51;
    assert!(close(o.first.unwrap(), kv + 0.002), "{o:?}");
    // Then four decode steps of 11 ms each.
    assert!(close(o.end.unwrap(), kv + 4.0 * 0.011 + 0.002), "{o:?}");
    assert_eq!((o.output_tokens, o.prompt_tokens, o.cached_tokens), (5, 100, 0));
    assert_eq!(o.itl.len(), 4);
    assert!(o.itl.iter().all(|&g| close(g, 0.011)), "{:?}", o.itl);
    assert_eq!((o.prefill_on.as_deref(), o.decode_on.as_deref()), (Some("prefill-000"), Some("decode-000")));
    assert_eq!(report.steps, 5);

    // A slow link: the transfer outlasts the prefill, and the wait is what is left of it.
    let mut cfg = config(1, 1, 0);
    cfg.link = Link { latency_ms: 0.5, gb_per_s: 0.0005 };
    let report = World::new(cfg, costs()).unwrap().run(vec![arrival(0.0, tokens(100, 1), 2)]);
    let whole = 0.0005 + 100.0 * 1000.0 / 0.0005e9;
    assert!(close(report.outcomes[0].end.unwrap(), 0.116 + (whole - 0.110) + 0.011 + 0.002), "{report:?}");
}

#[test]
fn kv_that_arrives_during_a_decode_step_waits_for_its_end() {
    // The second request's KV arrives while the decode worker steps the first one's tokens.
    let arrivals = vec![arrival(0.0, tokens(20, 1), 40), arrival(0.05, tokens(20, 2), 2)];
    let r = World::new(config(1, 1, 0), costs()).unwrap().run(arrivals);
    let a_first = r.outcomes[0].first.unwrap() - 0.002;
    // Request 0 decodes alone in steps of 11 ms from a_first. Request 1's reservation reaches
    // the decode worker (sent 50 ms, a hop, 2 ms routing, a hop) during one and is taken when
    // it ends; the prefill call follows (2 hops), then 30 ms of prefill and the last layer's
    // KV. That KV lands inside another step, and is taken when it ends.
    let step_end_after = |t: f64| a_first + ((t - a_first) / 0.011).ceil() * 0.011;
    let taken = step_end_after(0.05 + 0.001 + 0.002 + 0.001);
    let kv = taken + 0.002 + 0.030 + 0.000_5 + 20.0 * 1000.0 / 1e9 / 10.0;
    let want = step_end_after(kv) + 0.002;
    assert!(close(r.outcomes[1].first.unwrap(), want), "{:?} want first {want}", r.outcomes[1]);
}

#[test]
fn a_role_both_worker_prefills_and_decodes_in_its_own_steps() {
    let report = World::new(config(0, 0, 1), costs()).unwrap().run(vec![arrival(0.0, tokens(100, 1), 3)]);
    let o = &report.outcomes[0];
    // A hop in, 2 ms of routing, a hop to the worker, 110 ms of prefill, 2 hops out.
    assert!(close(o.first.unwrap(), 0.004 + 0.110 + 0.002), "{o:?}");
    assert!(close(o.end.unwrap(), 0.114 + 2.0 * 0.011 + 0.002), "{o:?}");
    assert_eq!((o.prefill_on.as_deref(), o.decode_on.as_deref()), (None, Some("both-000")));
}

fn load(seed: u64, n: usize, rate: f64) -> Vec<Arrival> {
    let times = crate::bench_serve::workload::arrivals(n, rate, seed);
    times
        .into_iter()
        .enumerate()
        .map(|(i, at)| {
            // Four shared prefixes of 64 tokens, then a request's own 16 to 200.
            let mut p = tokens(64, i as u64 % 4);
            p.extend(tokens(16 + (i * 37 + seed as usize) % 185, 1000 + i as u64 + seed * 10_000));
            arrival(at, p, 1 + ((i * 13) % 40) as u32)
        })
        .collect()
}

fn trace(r: &Report) -> Vec<(Option<f64>, Option<f64>, usize, Option<String>, Option<String>)> {
    r.outcomes.iter().map(|o| (o.first, o.end, o.cached_tokens, o.prefill_on.clone(), o.decode_on.clone())).collect()
}

#[test]
fn runs_repeat_under_their_seed() {
    let run = |seed| World::new(config(2, 2, 0), costs()).unwrap().run(load(seed, 80, 20.0));
    let (a, b, c) = (run(3), run(3), run(4));
    assert_eq!(trace(&a), trace(&b));
    assert_eq!((a.events, a.steps), (b.events, b.steps));
    assert_ne!(trace(&a), trace(&c));
    // The load spread over both pairs, and the prefixes were found.
    for w in ["prefill-000", "prefill-001", "decode-000", "decode-001"] {
        assert!(
            a.outcomes.iter().any(|o| o.prefill_on.as_deref() == Some(w) || o.decode_on.as_deref() == Some(w)),
            "{w}"
        );
    }
    assert!(a.outcomes.iter().filter(|o| o.cached_tokens >= 64).count() > 40, "{:?}", trace(&a));
}

#[test]
fn every_request_ends_once_finished_or_refused_and_nothing_stays_held() {
    // Decode pools of 24 blocks (384 tokens): under this load, requests wait for room, and
    // those that wait past 1 s are refused; past 40 in flight, the router refuses at once.
    let mut c = costs();
    c.kv_blocks = 24;
    let mut cfg = config(1, 2, 0);
    cfg.kv_wait = Duration::from_secs(1);
    cfg.max_inflight = 40;
    let arrivals = load(5, 200, 200.0);
    let wanted: Vec<u32> = arrivals.iter().map(|a| a.output_len).collect();
    let r = World::new(cfg, c).unwrap().run(arrivals);
    let ok = r.outcomes.iter().filter(|o| o.ok).count();
    let refused = r.outcomes.iter().filter(|o| o.refused).count();
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    assert_eq!(ok + refused, r.outcomes.len(), "every request finished or was refused");
    for (o, want) in r.outcomes.iter().zip(wanted) {
        assert!(o.ok != o.error.is_some(), "{o:?}");
        if o.ok {
            assert_eq!(o.output_tokens, want as usize, "{o:?}");
            assert!(o.sent <= o.first.unwrap() && o.first.unwrap() <= o.end.unwrap(), "{o:?}");
        }
    }
    let errors: Vec<&str> = r.outcomes.iter().filter_map(|o| o.error.as_deref()).collect();
    assert!(errors.iter().any(|e| e.contains("KV room")), "{errors:?}");
    assert!(r.outcomes.iter().any(|o| o.error.as_deref().is_some_and(|e| e.contains("in flight"))));
    assert_eq!((r.held_blocks, r.left_in_engines), (0, 0));
}

#[test]
fn a_closed_loop_sends_the_next_request_as_one_ends() {
    let mut cfg = config(1, 1, 0);
    cfg.concurrency = Some(1);
    let arrivals: Vec<Arrival> = (0..4).map(|i| arrival(0.0, tokens(40, i), 3)).collect();
    let r = World::new(cfg, costs()).unwrap().run(arrivals);
    for w in r.outcomes.windows(2) {
        assert!(close(w[1].sent, w[0].end.unwrap()), "{:?}", r.outcomes);
    }
}

#[test]
fn cache_aware_routing_sends_each_group_where_its_prefix_is() {
    let mut cfg = config(2, 1, 0);
    cfg.concurrency = Some(1);
    // Two groups of 128 shared tokens; one request at a time.
    let groups = [0u64, 1, 0, 0, 1, 1, 0];
    let arrivals: Vec<Arrival> = groups
        .iter()
        .enumerate()
        .map(|(i, &g)| {
            let mut p = tokens(128, 50 + g);
            p.extend(tokens(20, 900 + i as u64));
            arrival(0.0, p, 2)
        })
        .collect();
    let r = World::new(cfg, costs()).unwrap().run(arrivals);
    let on: Vec<&str> = r.outcomes.iter().map(|o| o.prefill_on.as_deref().unwrap()).collect();
    // The first group goes to the first worker; the second, held nowhere, to the worker
    // holding fewer blocks; each later request where its group's prefix is.
    assert_eq!(
        on,
        ["prefill-000", "prefill-001", "prefill-000", "prefill-000", "prefill-001", "prefill-001", "prefill-000"]
    );
    assert!(r.outcomes[2..].iter().all(|o| o.cached_tokens == 128), "{:?}", trace(&r));
}
