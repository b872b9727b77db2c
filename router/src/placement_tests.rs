//! `decide` as a table (inputs -> placement, reason), and the budget's moves.

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Inputs with a 1 s TTFT and 100 ms TPOT SLO, a measured 1000 tokens/s, the budget 256.
fn base(local: usize) -> Inputs {
    Inputs {
        local_uncached: local,
        remote_uncached: local,
        prefill_queue: 0.0,
        prefill_rate: Some(1000.0),
        decode_running: 4,
        tpot: Some(ms(30)),
        budget: 256,
        stall_cap: None,
        mode: Mode::Adaptive,
        slo: Slo { ttft: ms(1000), tpot: ms(100) },
    }
}

#[test]
fn decisions_as_a_table() {
    use Placement::{Local, Remote};
    let cases: Vec<(&str, Inputs, Placement, &str)> = vec![
        ("a short prompt stays", base(40), Local, "short"),
        ("at the budget stays", base(256), Local, "short"),
        ("a long prompt goes", base(900), Remote, "long"),
        ("all cached: nothing to ship", Inputs { tpot: Some(ms(95)), ..base(0) }, Local, "cached"),
        ("TPOT near its SLO: even short goes", Inputs { tpot: Some(ms(90)), ..base(40) }, Remote, "tpot_slo"),
        ("no TPOT measured yet: the budget", Inputs { tpot: None, ..base(100) }, Local, "short"),
        (
            "a long prefill queue and TPOT headroom: local",
            Inputs { prefill_queue: 2000.0, ..base(900) },
            Local,
            "prefill_queue",
        ),
        (
            "a long queue but little TPOT headroom: remote",
            Inputs { prefill_queue: 2000.0, tpot: Some(ms(70)), ..base(900) },
            Remote,
            "long",
        ),
        ("a short queue: remote is soon enough", Inputs { prefill_queue: 100.0, ..base(900) }, Remote, "long"),
        (
            "the decode worker's cache holds most: local is sooner",
            Inputs { local_uncached: 200, remote_uncached: 900, ..base(900) },
            Local,
            "short",
        ),
        (
            "no rate measured: no queue estimate",
            Inputs { prefill_queue: 5000.0, prefill_rate: None, ..base(900) },
            Remote,
            "long",
        ),
        (
            "a prefill whose stall outgrows the TPOT headroom",
            Inputs { stall_cap: Some(200.0), ..base(240) },
            Remote,
            "tpot_headroom",
        ),
        ("one the headroom absorbs", Inputs { stall_cap: Some(300.0), ..base(240) }, Local, "short"),
        (
            "headroom caps a queue's case too",
            Inputs { prefill_queue: 2000.0, stall_cap: Some(500.0), ..base(900) },
            Remote,
            "tpot_headroom",
        ),
        (
            "TPOT past its SLO, but nobody decodes there to stall",
            Inputs { tpot: Some(ms(95)), decode_running: 0, ..base(40) },
            Local,
            "short",
        ),
        (
            "an idle decoder takes a long prompt only for a long queue",
            Inputs { tpot: Some(ms(95)), decode_running: 0, ..base(900) },
            Remote,
            "long",
        ),
        (
            "an idle decoder and a long queue",
            Inputs { tpot: Some(ms(95)), decode_running: 0, prefill_queue: 2000.0, ..base(900) },
            Local,
            "prefill_queue",
        ),
        (
            "an idle decoder still keeps a prefill within the stall cap: arrivals would wait",
            Inputs { decode_running: 0, prefill_queue: 2000.0, stall_cap: Some(150.0), ..base(900) },
            Remote,
            "tpot_headroom",
        ),
        ("threshold: fixed", Inputs { mode: Mode::Threshold, tpot: Some(ms(99)), ..base(200) }, Local, "short"),
        ("threshold: long", Inputs { mode: Mode::Threshold, ..base(300) }, Remote, "long"),
        ("remote: always", Inputs { mode: Mode::Remote, ..base(0) }, Remote, "configured"),
    ];
    for (why, inputs, want, reason) in cases {
        assert_eq!(decide(&inputs), (want, reason), "{why}: {inputs:?}");
    }
}

fn control(mode: Mode) -> PlacementControl {
    PlacementControl::new(PlacementConfig { mode, threshold: 256, slo: Slo { ttft: ms(1000), tpot: ms(100) } })
}

/// Lets the next `place` adjust the budget.
fn age(c: &PlacementControl) {
    c.state.lock().unwrap().adjusted -= ADJUST_EVERY;
}

#[test]
fn the_budget_shrinks_as_tpot_nears_its_slo_and_grows_back_with_headroom_and_slow_ttft() {
    let c = control(Mode::Adaptive);
    for _ in 0..20 {
        c.observe_finished(ms(200), Some(ms(95)), 32);
    }
    age(&c);
    assert_eq!(c.place(400, 400, 0.0, 4), Placement::Remote);
    assert_eq!(c.budget(), 256 * 7 / 10, "TPOT p90 95 ms of 100: down");
    age(&c);
    c.place(10, 10, 0.0, 4);
    assert_eq!(c.budget(), 256 * 7 / 10 * 7 / 10, "and down again");
    // Decodes have room now, and TTFT is slow: up.
    c.state.lock().unwrap().finished.clear();
    for _ in 0..20 {
        c.observe_finished(ms(800), Some(ms(20)), 32);
    }
    let low = c.budget();
    age(&c);
    c.place(10, 10, 0.0, 4);
    assert_eq!(c.budget(), low * 13 / 10 + 16);
    // TPOT fine, TTFT fine, no queue: it holds.
    c.state.lock().unwrap().finished.clear();
    for _ in 0..20 {
        c.observe_finished(ms(100), Some(ms(20)), 32);
    }
    let held = c.budget();
    age(&c);
    c.place(10, 10, 0.0, 4);
    assert_eq!(c.budget(), held);
}

#[test]
fn a_fixed_threshold_never_moves() {
    let c = control(Mode::Threshold);
    for _ in 0..20 {
        c.observe_finished(ms(5000), Some(ms(500)), 32);
    }
    age(&c);
    assert_eq!(c.place(200, 200, 0.0, 4), Placement::Local);
    assert_eq!(c.budget(), 256);
}

#[test]
fn the_prefill_rate_follows_measured_prefills() {
    let c = control(Mode::Adaptive);
    assert_eq!(c.prefill_rate(), None);
    c.observe_prefill(1000, ms(1000));
    assert_eq!(c.prefill_rate(), Some(1000.0));
    c.observe_prefill(2000, ms(1000));
    assert!((c.prefill_rate().unwrap() - 1200.0).abs() < 1e-9);
    c.observe_prefill(4, ms(1000));
    assert!((c.prefill_rate().unwrap() - 1200.0).abs() < 1e-9, "a tiny prefill measures overheads, not rate");
}

#[test]
fn the_stall_cap_is_rate_times_headroom_times_the_median_output() {
    let c = control(Mode::Adaptive);
    c.observe_prefill(1000, ms(1000));
    for tokens in [10, 32, 40] {
        c.observe_finished(ms(100), Some(ms(20)), tokens);
    }
    let r = c.recent();
    assert_eq!(r.output_p50, Some(32));
    // 1000 tokens/s x (100 - 20) ms x 32 tokens = 2560 tokens.
    let cap = stall_cap(c.prefill_rate(), &r, ms(100)).unwrap();
    assert!((cap - 2560.0).abs() < 1e-6, "{cap}");
    assert_eq!(stall_cap(None, &r, ms(100)), None, "no rate measured: no cap");
    assert_eq!(stall_cap(c.prefill_rate(), &r, ms(10)), Some(0.0), "TPOT past its SLO: no room");
}
