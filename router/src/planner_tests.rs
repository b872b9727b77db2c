//! The planner's wants as a table, and its hysteresis over a shifting load.

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn slo() -> Slo {
    Slo { ttft: ms(1000), tpot: ms(100) }
}

fn worker(id: &str, role: Role) -> Seen {
    Seen {
        id: WorkerId::new(id).unwrap(),
        role,
        elastic: true,
        serving: true,
        prefills_in_flight: 0,
        queued_prefill_tokens: 0,
        running: 0,
        kv_use: 0.0,
    }
}

fn traffic(long_share: f64, tpot_ms: u64) -> Traffic {
    Traffic {
        prompts: 20,
        long_share,
        ttft_p90: Some(ms(300)),
        tpot_p90: Some(ms(tpot_ms)),
        prefill_rate: Some(1000.0),
    }
}

#[test]
fn wants_as_a_table() {
    let both2 = vec![worker("a", Role::Both), worker("b", Role::Both)];
    let split = vec![worker("a", Role::Prefill), worker("b", Role::Both)];
    let mut queued = split.clone();
    queued[0].queued_prefill_tokens = 3000;
    let three = vec![worker("a", Role::Prefill), worker("b", Role::Both), worker("c", Role::Both)];
    let mut queued3 = three.clone();
    queued3[0].queued_prefill_tokens = 3000;
    let cases: Vec<(&str, &Vec<Seen>, Traffic, (usize, &str))> = vec![
        ("long prompts stall the decodes", &both2, traffic(0.9, 60), (1, "long_prompts_stall_decodes")),
        ("long prompts but TPOT is fine", &both2, traffic(0.9, 20), (0, "steady")),
        ("short prompts, all both", &both2, traffic(0.0, 90), (0, "steady")),
        ("short prompts: the prefill worker decodes", &split, traffic(0.1, 20), (0, "short_prompts")),
        ("long prompts keep the split", &split, traffic(0.9, 20), (1, "steady")),
        ("a long queue, but no one left to spare", &queued, traffic(0.9, 20), (1, "steady")),
        ("a long queue and spare decode", &queued3, traffic(0.9, 20), (2, "prefill_queue")),
        ("a long queue but decodes suffer", &queued3, traffic(0.9, 70), (1, "steady")),
        ("too little traffic to judge", &split, Traffic { prompts: 2, ..traffic(0.0, 20) }, (1, "idle")),
    ];
    for (why, workers, t, want_) in cases {
        assert_eq!(want(workers, &t, slo()), want_, "{why}");
    }
}

#[test]
fn a_want_is_confirmed_before_it_is_acted_on() {
    let mut p = Planner::new(PlannerConfig { confirm: 3, dwell: Duration::from_secs(10), ..Default::default() });
    let split = vec![worker("a", Role::Prefill), worker("b", Role::Both)];
    let t0 = Instant::now();
    let short = traffic(0.0, 20);
    assert_eq!(p.step("m", &split, &short, slo(), t0).action, "confirming");
    assert_eq!(p.step("m", &split, &short, slo(), t0 + ms(1000)).action, "confirming");
    let s = p.step("m", &split, &short, slo(), t0 + ms(2000));
    assert_eq!(s.flip, Some(Flip { worker: WorkerId::new("a").unwrap(), to: Role::Both }));
    assert_eq!(s.desired_prefill, 0);
    // A want that changes midway starts its count again.
    let mut p = Planner::new(PlannerConfig { confirm: 3, ..Default::default() });
    p.step("m", &split, &short, slo(), t0);
    p.step("m", &split, &traffic(0.9, 20), slo(), t0 + ms(1000));
    assert_eq!(p.step("m", &split, &short, slo(), t0 + ms(2000)).action, "confirming");
}

#[test]
fn a_prefill_worker_exporting_kv_is_never_removed() {
    let mut p = Planner::new(PlannerConfig { confirm: 1, ..Default::default() });
    let mut split = vec![worker("a", Role::Prefill), worker("b", Role::Both)];
    split[0].prefills_in_flight = 2;
    let s = p.step("m", &split, &traffic(0.0, 20), slo(), Instant::now());
    assert_eq!((s.flip, s.action, s.reason), (None, "blocked", "exports_in_flight"));
    assert_eq!(s.desired_prefill, 1, "the published count keeps the exporting worker");
}

#[test]
fn a_shifting_load_flips_a_worker_at_most_once_per_dwell() {
    // The load alternates every 3 s between long prompts that stall decodes and short ones,
    // for 120 s; the planner looks every second. The roles follow its flips.
    let dwell = Duration::from_secs(20);
    let mut p = Planner::new(PlannerConfig { confirm: 2, dwell, ..Default::default() });
    let mut workers = vec![worker("a", Role::Both), worker("b", Role::Both)];
    let t0 = Instant::now();
    let mut flips: Vec<(Duration, WorkerId)> = Vec::new();
    for sec in 0..120u64 {
        let t = if (sec / 3) % 2 == 0 { traffic(0.9, 60) } else { traffic(0.0, 60) };
        let s = p.step("m", &workers, &t, slo(), t0 + Duration::from_secs(sec));
        if let Some(f) = s.flip {
            let w = workers.iter_mut().find(|w| w.id == f.worker).unwrap();
            w.role = f.to;
            flips.push((Duration::from_secs(sec), f.worker));
        }
        assert!(workers.iter().any(|w| w.role.can_decode()), "one worker always decodes");
    }
    assert!(flips.len() >= 2, "the shifting load moved the split: {flips:?}");
    for pair in flips.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= dwell, "two changes within the dwell: {flips:?}");
    }
}

#[test]
fn only_elastic_serving_workers_are_flipped() {
    let mut p = Planner::new(PlannerConfig { confirm: 1, ..Default::default() });
    let mut both2 = vec![worker("a", Role::Both), worker("b", Role::Both)];
    both2[0].elastic = false;
    both2[1].serving = false;
    let s = p.step("m", &both2, &traffic(0.9, 60), slo(), Instant::now());
    assert_eq!((s.flip, s.reason), (None, "no_elastic_worker"));
    both2[1].serving = true;
    let s = p.step("m", &both2, &traffic(0.9, 60), slo(), Instant::now());
    assert_eq!(s.flip, Some(Flip { worker: WorkerId::new("b").unwrap(), to: Role::Prefill }));
}

#[test]
fn the_published_split_flips_elastic_workers_and_scales_fixed_ones() {
    let split = vec![worker("a", Role::Prefill), worker("b", Role::Both), worker("c", Role::Decode)];
    assert_eq!(published_split(&split, 2), (2, 1), "elastic: a decode worker becomes a prefill worker");
    assert_eq!(published_split(&split, 0), (0, 3));
    let fixed: Vec<Seen> = split.iter().cloned().map(|w| Seen { elastic: false, ..w }).collect();
    assert_eq!(published_split(&fixed, 2), (2, 2), "fixed roles: a prefill pod is added, no decode pod removed");
    assert_eq!(published_split(&fixed, 0), (0, 3), "and one removed gives its place to decode");
    assert_eq!(published_split(&fixed, 1), (1, 2));
}

fn decoding(id: &str, kv_use: f64, running: u32) -> Seen {
    Seen { kv_use, running, ..worker(id, Role::Decode) }
}

#[test]
fn rebalancing_as_a_table() {
    let w = |id: &str| WorkerId::new(id).unwrap();
    let moves = |from: &str, to: &str, count| Some(Rebalance { from: w(from), to: w(to), count });
    let mut draining = decoding("b", 0.1, 0);
    draining.serving = false;
    let cases: Vec<(&str, Vec<Seen>, Option<Rebalance>)> = vec![
        ("hot and cold: half the gap moves", vec![decoding("a", 0.9, 10), decoding("b", 0.1, 1)], moves("a", "b", 4)),
        ("a small gap closes with one", vec![decoding("a", 0.82, 3), decoding("b", 0.5, 1)], moves("a", "b", 1)),
        ("nobody hot", vec![decoding("a", 0.7, 10), decoding("b", 0.1, 1)], None),
        ("nobody cold", vec![decoding("a", 0.95, 10), decoding("b", 0.6, 8)], None),
        ("the cold one takes no work", vec![decoding("a", 0.9, 10), draining], None),
        ("one decode is not split", vec![decoding("a", 0.9, 1), decoding("b", 0.0, 0)], None),
        ("a prefill worker is no destination", vec![decoding("a", 0.9, 10), worker("p", Role::Prefill)], None),
        (
            "the hottest to the coldest",
            vec![decoding("a", 0.85, 6), decoding("b", 0.95, 6), decoding("c", 0.3, 2), decoding("d", 0.4, 2)],
            moves("b", "c", 2),
        ),
        ("one worker", vec![decoding("a", 0.99, 30)], None),
    ];
    for (why, workers, want) in cases {
        assert_eq!(rebalance(&workers, 0.8, 0.5), want, "{why}");
    }
    // Not again off the same worker within the dwell.
    let mut p = Planner::new(PlannerConfig { rebalance_dwell: Duration::from_secs(5), ..Default::default() });
    let ws = vec![decoding("a", 0.9, 10), decoding("b", 0.1, 1)];
    let t0 = Instant::now();
    assert!(p.rebalance(&ws, t0).is_some());
    assert_eq!(p.rebalance(&ws, t0 + Duration::from_secs(1)), None);
    assert!(p.rebalance(&ws, t0 + Duration::from_secs(6)).is_some());
}
