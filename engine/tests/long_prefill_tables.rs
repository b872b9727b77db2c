//! Table tests for long prefills: while shorter prompts wait, prompts longer than
//! `long_prefill_threshold` take at most `long_prefill_share` of a step's token budget;
//! alone, or among decodes only, a long prompt takes the whole budget.

mod scheduler_support;
use scheduler_support::*;

use tandem_engine::scheduler::{RequestId, Scheduled, SchedulerConfig, Status};

fn long_cfg(budget: usize, threshold: usize, share: usize) -> SchedulerConfig {
    SchedulerConfig { long_prefill_threshold: threshold, long_prefill_share: share, ..cfg(budget, 8) }
}

#[test]
fn short_prompts_arriving_behind_a_long_one_are_scheduled_in_the_next_step() {
    // (budget, threshold, share %, short prompt lengths,
    //  expected chunk of the long prompt and of each short one in the step after they arrive)
    type Case = (usize, usize, usize, &'static [usize], usize, &'static [usize]);
    let table: &[Case] = &[
        (512, 512, 50, &[3], 256, &[3]),
        (512, 512, 50, &[3, 3, 3], 256, &[3, 3, 3]),
        (512, 64, 25, &[3, 60], 128, &[3, 60]),
        (512, 512, 1, &[3], 5, &[3]),
        // The shorts want more than the rest of the budget: they are chunked as usual.
        (512, 512, 50, &[300, 300], 256, &[256]),
        (512, 512, 25, &[300, 300], 128, &[300, 84]),
        // Yielding off: the long prompt takes everything, the shorts wait.
        (512, 512, 100, &[3], 512, &[]),
    ];
    for &(budget, threshold, share, shorts, long_chunk, short_chunks) in table {
        let case = format!("budget {budget} threshold {threshold} share {share} shorts {shorts:?}");
        let mut s = sched(long_cfg(budget, threshold, share), 1024, 16, true);
        s.add(req(1, prompt(8000, 1), 1)).unwrap();
        let (p1, _) = step(&mut s, 5);
        assert_eq!(p1.scheduled, vec![Scheduled { id: RequestId(1), start: 0, len: budget, sample: false }], "{case}");
        for (i, &n) in shorts.iter().enumerate() {
            s.add(req(10 + i as u64, prompt(n, 2 + i as u32), 1)).unwrap();
        }
        let (p2, _) = step(&mut s, 5);
        assert_eq!(entry(&p2, 1).map(|e| e.len), Some(long_chunk), "{case}: {p2:?}");
        let got: Vec<usize> = (0..shorts.len()).filter_map(|i| entry(&p2, 10 + i as u64)).map(|e| e.len).collect();
        assert_eq!(got, short_chunks, "{case}: {p2:?}");
        for (i, &len) in short_chunks.iter().enumerate() {
            assert_eq!(entry(&p2, 10 + i as u64).unwrap().sample, len == shorts[i], "{case}");
        }
        run_to_end(&mut s, 5, 100);
    }
}

#[test]
fn alone_a_long_prompt_takes_the_whole_budget() {
    // (budget, threshold, share %, prompt): every chunk is the full budget, as without the cap.
    let table: &[(usize, usize, usize, usize)] =
        &[(512, 512, 50, 8000), (512, 16, 1, 3000), (256, 100, 25, 1000), (64, 8, 10, 640)];
    for &(budget, threshold, share, n) in table {
        let mut s = sched(long_cfg(budget, threshold, share), 1024, 16, true);
        s.add(req(1, prompt(n, 1), 1)).unwrap();
        let mut start = 0;
        while start < n {
            let (plan, _) = step(&mut s, 5);
            let len = budget.min(n - start);
            assert_eq!(
                plan.scheduled,
                vec![Scheduled { id: RequestId(1), start, len, sample: start + len == n }],
                "budget {budget} threshold {threshold} share {share} prompt {n}"
            );
            start += len;
        }
        assert!(!s.has_unfinished());
    }
}

#[test]
fn long_prompts_alone_keep_first_come_first_served() {
    // Two long prompts and nothing short: the older takes the whole budget.
    let mut s = sched(long_cfg(512, 256, 50), 1024, 16, true);
    s.add(req(1, prompt(2000, 1), 1)).unwrap();
    s.add(req(2, prompt(2000, 2), 1)).unwrap();
    let (p, _) = step(&mut s, 5);
    assert_eq!(p.scheduled, vec![Scheduled { id: RequestId(1), start: 0, len: 512, sample: false }]);
}

#[test]
fn long_prompts_share_one_cap_and_decodes_still_run() {
    // A decoding request, two long prompts waiting and one short: the long ones together
    // take their share, the short prompt and the decode run too.
    let mut s = sched(long_cfg(512, 256, 50), 1024, 16, true);
    s.add(req(1, prompt(10, 1), 50)).unwrap();
    step(&mut s, 5); // request 1 now decodes
    s.add(req(2, prompt(2000, 2), 1)).unwrap();
    s.add(req(3, prompt(2000, 3), 1)).unwrap();
    s.add(req(4, prompt(5, 4), 1)).unwrap();
    let (p, _) = step(&mut s, 5);
    assert_eq!(entry(&p, 1).map(|e| e.len), Some(1), "{p:?}");
    assert_eq!(entry(&p, 2).map(|e| e.len), Some(256), "{p:?}");
    assert_eq!(entry(&p, 3), None, "{p:?}");
    assert_eq!(entry(&p, 4).map(|e| (e.len, e.sample)), Some((5, true)), "{p:?}");
    // The passed-over long prompt is still queued, ahead of later arrivals.
    assert_eq!(s.get(RequestId(3)).unwrap().status, Status::Waiting);
    run_to_end(&mut s, 5, 100);
}

#[test]
fn decodes_alone_do_not_hold_a_long_prompt_back() {
    let mut s = sched(long_cfg(512, 256, 25), 1024, 16, true);
    s.add(req(1, prompt(10, 1), 50)).unwrap();
    s.add(req(2, prompt(10, 2), 50)).unwrap();
    step(&mut s, 5); // both decode from now on
    s.add(req(3, prompt(2000, 3), 1)).unwrap();
    let (p, _) = step(&mut s, 5);
    assert_eq!(entry(&p, 3).map(|e| e.len), Some(510), "{p:?}");
    assert_eq!(p.num_tokens(), 512);
}

#[test]
fn a_stream_of_short_prompts_never_starves_a_long_one() {
    // Short prompts arrive every step and want the whole budget; the long one keeps its share.
    let mut s = sched(long_cfg(512, 256, 25), 1024, 16, true);
    s.add(req(1, prompt(4000, 1), 1)).unwrap();
    let mut next = 100;
    let mut done = 0;
    for _ in 0..40 {
        for _ in 0..3 {
            s.add(req(next, prompt(200, next as u32), 1)).unwrap();
            next += 1;
        }
        let (p, _) = step(&mut s, 5);
        let long = entry(&p, 1).map_or(0, |e| e.len);
        assert!(long >= 128 || s.get(RequestId(1)).is_none_or(|r| r.num_computed + long == 4000), "{p:?}");
        done += long;
        if done == 4000 {
            break;
        }
    }
    assert_eq!(done, 4000, "the long prompt finished within 40 steps");
}
