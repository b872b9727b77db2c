//! The `fair` (virtual token counters) and `sjf` (shortest predicted job first, aged)
//! policies: their counters and ranks alone, then the orders a scheduler makes with them.

mod scheduler_support;

use std::sync::Arc;

use scheduler_support::*;
use tandem_engine::scheduler::{Policy, RequestId, Status};
use tandem_engine::share::{sjf_key, sjf_rank, FairConfig, Share, SjfConfig, Stage, Vtc};

fn t(name: &str) -> Option<Arc<str>> {
    Some(Arc::from(name))
}

fn share(tenant: &str) -> Share {
    Share { tenant: t(tenant), ..Share::default() }
}

fn predicted(n: u32) -> Share {
    Share { predicted_output: Some(n), ..Share::default() }
}

#[test]
fn counters_charge_weighted_tokens_and_lift_a_tenant_that_was_idle() {
    let mut cfg = FairConfig::default();
    cfg.weights.insert("gold".into(), 2.0);
    let mut v = Vtc::new(cfg);
    // (step, tenant A's key, tenant B's key, gold's key)
    v.activate(t("a").as_ref(), 0.0);
    v.charge(t("a").as_ref(), Stage::Prefill, 100); // 100 × 1
    v.charge(t("a").as_ref(), Stage::Decode, 10); // 10 × 2
    assert_eq!(v.key(t("a").as_ref()), 120.0);
    // B arrives while A is active: lifted to A's counter, not starting from 0.
    v.activate(t("b").as_ref(), 0.0);
    assert_eq!(v.key(t("b").as_ref()), 120.0);
    // Gold pays half: 100 prompt tokens cost it 50.
    v.activate(t("gold").as_ref(), 0.0);
    let lifted = v.key(t("gold").as_ref());
    v.charge(t("gold").as_ref(), Stage::Prefill, 100);
    assert_eq!(v.key(t("gold").as_ref()) - lifted, 50.0);
    // B leaves and A keeps being served; when B returns it is lifted again (no banking).
    v.deactivate(t("b").as_ref());
    v.charge(t("a").as_ref(), Stage::Decode, 500);
    v.activate(t("b").as_ref(), 0.0);
    assert_eq!(v.key(t("b").as_ref()), v.key(t("gold").as_ref()).min(v.key(t("a").as_ref())));
    // Service reported is what was charged, lifts excluded.
    let served: std::collections::HashMap<String, f64> = v.served().into_iter().collect();
    assert_eq!(served["a"], 1120.0);
    assert_eq!(served["gold"], 50.0);
    assert!(!served.contains_key("b"), "B was lifted but never served");
}

#[test]
fn service_elsewhere_counts_in_the_order_and_in_the_lift() {
    let mut v = Vtc::new(FairConfig::default());
    // A consumed 10,000 on the decode pool; here (a prefill worker) it has used nothing yet.
    v.activate(t("a").as_ref(), 10_000.0);
    v.activate(t("b").as_ref(), 0.0);
    // B, with nothing elsewhere, is lifted to the least active key: A's 10,000.
    assert_eq!(v.key(t("b").as_ref()), 10_000.0);
    v.charge(t("b").as_ref(), Stage::Prefill, 10);
    assert!(v.key(t("a").as_ref()) < v.key(t("b").as_ref()));
    // A third tenant arriving alone (nobody active) keeps its own counter.
    let mut w = Vtc::new(FairConfig::default());
    w.activate(t("c").as_ref(), 5.0);
    assert_eq!(w.key(t("c").as_ref()), 5.0);
}

#[test]
fn sjf_ranks_by_work_left_and_ages_with_the_wait() {
    // (prompt left, predicted, max_tokens, generated) -> rank
    let table: &[(usize, Option<u32>, usize, usize, f64)] = &[
        (0, Some(10), 100, 0, 10.0),
        (0, Some(10), 100, 4, 6.0),
        (0, Some(500), 100, 0, 100.0), // max_tokens caps the prediction
        (0, Some(10), 100, 30, 1.0),   // past its prediction: one more token expected
        (320, None, 100, 0, 10.0),     // a prefill-only request: its prompt at 1/32 a token
        (64, Some(8), 100, 0, 10.0),
    ];
    for &(left, p, max, gen, want) in table {
        assert_eq!(sjf_rank(left, p, max, gen), want, "{left} {p:?} {max} {gen}");
    }
    let cfg = SjfConfig { aging: 10.0, max_wait_ms: 5_000 };
    // 2 s of waiting is worth 20 tokens of rank.
    assert!(sjf_key(100.0, 2_000, &cfg, 1) == sjf_key(80.0, 0, &cfg, 1));
    assert!(sjf_key(100.0, 2_000, &cfg, 1) < sjf_key(81.0, 0, &cfg, 0));
    // After max_wait: before everything that has not, in arrival order among themselves.
    assert!(sjf_key(1e9, 5_000, &cfg, 7) < sjf_key(0.0, 4_999, &cfg, 0));
    assert!(sjf_key(1e9, 6_000, &cfg, 7) < sjf_key(1.0, 9_000, &cfg, 8));
}

#[test]
fn fair_admits_the_tenant_with_the_least_service_before_a_flood() {
    for (policy, b_first) in [(Policy::Fair, true), (Policy::Fcfs, false)] {
        // One sequence at a time: admission order is service order.
        let mut s = sched(SchedulerConfig { policy: policy.clone(), ..cfg(64, 1) }, 256, 16, false);
        for i in 0..10 {
            s.add(NewRequest { share: share("a"), ..req(i, prompt(16, i as u32), 4) }).unwrap();
        }
        step(&mut s, 5); // A's first request runs
        s.add(NewRequest { share: share("b"), ..req(100, prompt(16, 100), 4) }).unwrap();
        let mut order = Vec::new();
        for _ in 0..200 {
            if !s.has_unfinished() {
                break;
            }
            let (plan, _) = step(&mut s, 5);
            for e in plan.scheduled.iter().filter(|e| e.start == 0) {
                order.push(e.id.0);
            }
        }
        let b_at = order.iter().position(|&i| i == 100).unwrap();
        assert_eq!(b_at == 0, b_first, "{policy:?}: {order:?}");
        if !b_first {
            assert_eq!(b_at, 9, "fcfs serves B after A's whole backlog: {order:?}");
        }
    }
}

#[test]
fn fair_keeps_two_backlogged_tenants_within_the_counter_bound() {
    // Both tenants keep 8 requests waiting; tenant B's are four times as long to generate.
    let c = SchedulerConfig { policy: Policy::Fair, ..cfg(128, 4) };
    let mut s = sched(c, 1024, 16, false);
    let (mut next, mut waiting) = (0u64, [0usize; 2]);
    let mut tenant_of = std::collections::HashMap::new();
    let mut max_gap: f64 = 0.0;
    for _ in 0..400 {
        for (k, name) in ["a", "b"].iter().enumerate() {
            while waiting[k] < 8 {
                next += 1;
                let out = if k == 0 { 8 } else { 32 };
                s.add(NewRequest { share: share(name), ..req(next, prompt(24, next as u32), out) }).unwrap();
                tenant_of.insert(next, k);
                waiting[k] += 1;
            }
        }
        let (plan, _) = step(&mut s, 5);
        for e in plan.scheduled.iter().filter(|e| e.start == 0) {
            waiting[tenant_of[&e.id.0]] -= 1;
        }
        let served: std::collections::HashMap<String, f64> = s.tenants().served().into_iter().collect();
        let gap = (served.get("a").unwrap_or(&0.0) - served.get("b").unwrap_or(&0.0)).abs();
        max_gap = max_gap.max(gap);
    }
    // VTC's bound (Sheng et al., Theorem 4.3): while both are backlogged their service
    // differs by at most twice the largest cost of one request's prompt or of its output.
    let f = FairConfig::default();
    let bound = 2.0 * (f.prefill_cost * 24.0).max(f.decode_cost * 32.0);
    let served: std::collections::HashMap<String, f64> = s.tenants().served().into_iter().collect();
    assert!(served["a"] > 1000.0 && served["b"] > 1000.0, "{served:?}");
    assert!(max_gap <= bound, "service gap {max_gap} over the bound {bound}");
    eprintln!("fair: largest service gap {max_gap} (bound {bound})");
}

#[test]
fn sjf_admits_the_shortest_predicted_first_and_preempts_the_longest() {
    let c = SchedulerConfig { policy: Policy::Sjf, ..cfg(64, 1) };
    let mut s = sched(c, 256, 16, false);
    for (id, p) in [(1, 400), (2, 30), (3, 5), (4, 100)] {
        s.add(NewRequest { share: predicted(p), ..req(id, prompt(16, id as u32), 500) }).unwrap();
    }
    let (plan, _) = step(&mut s, 5);
    assert_eq!(plan.scheduled[0].id, RequestId(3));

    // Preemption: the victim is the running request with the most predicted work left.
    let c = SchedulerConfig { policy: Policy::Sjf, ..cfg(64, 8) };
    let mut s = sched(c, 6, 4, false);
    for (id, p) in [(1, 3), (2, 300), (3, 20)] {
        s.add(NewRequest { share: predicted(p), ..req(id, prompt(4, id as u32), 300) }).unwrap();
    }
    let mut victim = None;
    for _ in 0..20 {
        let (plan, _) = step(&mut s, 5);
        if let Some(&v) = plan.preempted.first() {
            victim = Some(v);
            break;
        }
    }
    assert_eq!(victim, Some(RequestId(2)));
}

#[test]
fn sjf_lets_a_long_request_go_first_once_it_has_waited_max_wait() {
    let c = SchedulerConfig { policy: Policy::Sjf, sjf: SjfConfig { aging: 0.0, max_wait_ms: 1_000 }, ..cfg(64, 1) };
    let mut s = sched(c, 256, 16, false);
    s.set_clock(0);
    s.add(NewRequest { share: predicted(400), ..req(1, prompt(16, 1), 400) }).unwrap();
    s.set_clock(500);
    s.add(NewRequest { share: predicted(4), ..req(2, prompt(16, 2), 8) }).unwrap();
    let (plan, _) = step(&mut s, 5);
    assert_eq!(plan.scheduled[0].id, RequestId(2), "the short one first while the long one is young");
    run_to_end_of(&mut s, RequestId(2));
    s.add(NewRequest { share: predicted(4), ..req(3, prompt(16, 3), 400) }).unwrap();
    s.set_clock(1_000);
    let (plan, _) = step(&mut s, 5);
    assert_eq!(plan.scheduled[0].id, RequestId(1), "waited max_wait: before any shorter one");
}

fn run_to_end_of(s: &mut tandem_engine::scheduler::Scheduler, id: RequestId) {
    for _ in 0..100 {
        if matches!(s.get(id).map(|r| r.status), Some(Status::Finished(_)) | None) {
            return;
        }
        step(s, 5);
    }
    panic!("{id:?} did not finish");
}

#[test]
fn over_max_seqs_the_running_requests_with_the_smallest_keys_run() {
    // Reserved requests (a decode worker's) never wait: beyond max_seqs they queue inside
    // the running set, and the policy chooses which run.
    for (policy, want) in [(Policy::Sjf, vec![3, 4]), (Policy::Fcfs, vec![1, 2])] {
        let mut s = sched(SchedulerConfig { policy: policy.clone(), ..cfg(64, 2) }, 256, 4, false);
        for (id, p) in [(1, 300), (2, 200), (3, 2), (4, 5)] {
            s.add_remote(NewRequest { share: predicted(p), ..req(id, prompt(8, id as u32), 400) }).unwrap();
            s.remote_kv_ready(RequestId(id), 7).unwrap();
        }
        let (plan, _) = step(&mut s, 5);
        let mut ran: Vec<u64> = plan.scheduled.iter().map(|e| e.id.0).collect();
        ran.sort();
        assert_eq!(ran, want, "{policy:?}");
    }
}
