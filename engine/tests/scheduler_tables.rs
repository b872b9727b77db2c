//! Table tests for `Scheduler`: token budget and chunk boundaries,
//! decode-first order, the `max_seqs` cap, abort, preemption and recompute,
//! the priority policy, prefix hits, remote KV, parallel sampling with
//! copy-on-write, and admission errors. Block invariants are checked after
//! every step. Long prefills have their own file, long_prefill_tables.rs.

mod scheduler_support;
use scheduler_support::*;

use tandem_engine::scheduler::{Policy, RequestId, Sampled, Scheduled, SchedulerConfig, Status};
use tandem_engine::EngineError;
use tandem_engine::FinishReason;

// ---------------------------------------------------------------- budget

#[test]
fn a_long_prompt_is_chunked_by_the_budget() {
    // (prompt, budget, expected chunk lengths until the first sample)
    let table: &[(usize, usize, &[usize])] = &[
        (1000, 512, &[512, 488]),
        (1024, 512, &[512, 512]),
        (1025, 512, &[512, 512, 1]),
        (511, 512, &[511]),
        (512, 512, &[512]),
        (10, 3, &[3, 3, 3, 1]),
        (7, 1, &[1, 1, 1, 1, 1, 1, 1]),
    ];
    for &(n, budget, chunks) in table {
        let mut s = sched(cfg(budget, 8), 128, 16, true);
        s.add(req(1, prompt(n, 1), 4)).unwrap();
        let mut start = 0;
        for (i, &len) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let (plan, _) = step(&mut s, 5);
            assert_eq!(
                plan.scheduled,
                vec![Scheduled { id: RequestId(1), start, len, sample: last }],
                "prompt {n} budget {budget} chunk {i}"
            );
            start += len;
            assert_eq!(s.get(RequestId(1)).unwrap().num_computed, start);
            assert_eq!(s.get(RequestId(1)).unwrap().output.len(), usize::from(last));
        }
        // Then one token per step.
        let (plan, _) = step(&mut s, 5);
        assert_eq!(plan.scheduled, vec![Scheduled { id: RequestId(1), start: n, len: 1, sample: true }]);
    }
}

#[test]
fn the_budget_is_shared_and_the_remainder_fills_the_next_prompt() {
    // Long prefills yielding turned off: plain first come, first served.
    let mut s = sched(SchedulerConfig { long_prefill_share: 100, ..cfg(512, 8) }, 128, 16, true);
    s.add(req(1, prompt(1000, 1), 8)).unwrap();
    s.add(req(2, prompt(100, 2), 8)).unwrap();
    // Step 1: A takes the whole budget; B does not fit at all.
    let (p1, _) = step(&mut s, 5);
    assert_eq!(p1.scheduled, vec![Scheduled { id: RequestId(1), start: 0, len: 512, sample: false }]);
    assert_eq!(s.get(RequestId(2)).unwrap().status, Status::Waiting);
    // Step 2: A's last 488, B's first 24.
    let (p2, _) = step(&mut s, 5);
    assert_eq!(
        p2.scheduled,
        vec![
            Scheduled { id: RequestId(1), start: 512, len: 488, sample: true },
            Scheduled { id: RequestId(2), start: 0, len: 24, sample: false },
        ]
    );
    // Step 3: A's decode first, then B's remaining 76.
    let (p3, _) = step(&mut s, 5);
    assert_eq!(
        p3.scheduled,
        vec![
            Scheduled { id: RequestId(1), start: 1000, len: 1, sample: true },
            Scheduled { id: RequestId(2), start: 24, len: 76, sample: true },
        ]
    );
    for p in [&p1, &p2, &p3] {
        assert_eq!(p.num_tokens().min(512), p.num_tokens());
    }
    assert_eq!(s.stats().scheduled_tokens, 512 + 512 + 77);
    assert_eq!(s.stats().steps, 3);
}

#[test]
fn running_decodes_are_scheduled_before_a_new_prefill() {
    // (budget, prompt of the newcomer, expected newcomer chunk)
    let table: &[(usize, usize, usize)] = &[(64, 40, 40), (8, 40, 6), (3, 40, 1)];
    for &(budget, n, chunk) in table {
        let mut s = sched(cfg(budget, 8), 64, 4, true);
        s.add(req(1, prompt(2, 1), 50)).unwrap();
        s.add(req(2, prompt(2, 2), 50)).unwrap();
        step(&mut s, 5); // both prefilled (4 tokens <= any budget here... or chunked)
        while s.get(RequestId(2)).unwrap().output.is_empty() || s.get(RequestId(1)).unwrap().output.is_empty() {
            step(&mut s, 5);
        }
        s.add(req(3, prompt(n, 3), 4)).unwrap();
        let (plan, _) = step(&mut s, 5);
        let ids: Vec<u64> = plan.scheduled.iter().map(|x| x.id.0).collect();
        assert_eq!(ids, vec![1, 2, 3], "budget {budget}: decodes first");
        assert_eq!(plan.scheduled[0].len, 1);
        assert_eq!(plan.scheduled[1].len, 1);
        assert_eq!(plan.scheduled[2], Scheduled { id: RequestId(3), start: 0, len: chunk, sample: chunk == n });
    }
}

#[test]
fn max_seqs_caps_running_requests() {
    for max_seqs in [1usize, 2, 3] {
        let mut s = sched(cfg(512, max_seqs), 64, 4, true);
        for id in 1..=4 {
            s.add(req(id, prompt(5, id as u32), 3)).unwrap();
        }
        let (plan, _) = step(&mut s, 5);
        let ids: Vec<u64> = plan.scheduled.iter().map(|x| x.id.0).collect();
        assert_eq!(ids, (1..=max_seqs as u64).collect::<Vec<_>>());
        assert_eq!(s.num_running(), max_seqs);
        assert_eq!(s.num_waiting(), 4 - max_seqs);
        // The rest wait until someone finishes, then join.
        let mut finished = Vec::new();
        for _ in 0..100 {
            if !s.has_unfinished() {
                break;
            }
            let (plan, fin) = step(&mut s, 5);
            assert!(plan.scheduled.len() <= max_seqs);
            assert!(s.num_running() <= max_seqs);
            finished.extend(fin.into_iter().map(|(id, f)| {
                assert_eq!(f, FinishReason::Length);
                id.0
            }));
        }
        finished.sort();
        assert_eq!(finished, vec![1, 2, 3, 4]);
    }
}

// ---------------------------------------------------------------- abort

#[test]
fn abort_returns_every_block() {
    for caching in [false, true] {
        let mut s = sched(cfg(16, 8), 32, 4, caching);
        for id in 1..=4 {
            s.add(req(id, prompt(10 + id as usize, id as u32), 100)).unwrap();
        }
        // Some running (one mid-prefill), one still waiting.
        for _ in 0..3 {
            step(&mut s, 5);
        }
        assert!(s.num_running() >= 2);
        assert!(s.stats().blocks_used > 0);
        for id in [3u64, 1, 4, 2] {
            s.finish(RequestId(id), FinishReason::Abort);
            ok(&s);
            let r = s.get(RequestId(id)).unwrap();
            assert_eq!(r.status, Status::Finished(FinishReason::Abort));
            assert!(r.blocks.table.is_empty());
        }
        assert!(!s.has_unfinished());
        assert_eq!(s.blocks.n_free(), s.blocks.n_blocks(), "caching {caching}");
        assert_eq!(s.stats().blocks_used, 0);
        // Aborting again, or an unknown id, is a no-op.
        s.finish(RequestId(1), FinishReason::Stop);
        s.finish(RequestId(99), FinishReason::Abort);
        assert_eq!(s.get(RequestId(1)).unwrap().status, Status::Finished(FinishReason::Abort));
        assert!(s.take_finished(RequestId(1)).is_some());
        assert!(s.get(RequestId(1)).is_none());
        assert!(s.schedule().is_empty());
    }
}

#[test]
fn abort_between_schedule_and_update_keeps_sampled_tokens_aligned() {
    for take in [false, true] {
        let mut s = sched(cfg(64, 8), 32, 4, true);
        for id in 1..=3 {
            s.add(req(id, prompt(3, id as u32), 10)).unwrap();
        }
        let plan = s.schedule();
        assert_eq!(plan.scheduled.len(), 3);
        // The client of request 2 leaves while the step runs.
        s.finish(RequestId(2), FinishReason::Abort);
        if take {
            s.take_finished(RequestId(2)).unwrap();
        }
        let sampled = vec![Sampled::one(101), Sampled::one(102), Sampled::one(103)];
        let fin = s.update(&plan, &sampled);
        assert!(fin.is_empty());
        assert_eq!(s.get(RequestId(1)).unwrap().output, vec![101]);
        assert_eq!(s.get(RequestId(3)).unwrap().output, vec![103], "request 3 keeps its own token");
        ok(&s);
    }
}

#[test]
fn a_request_that_never_admits_can_be_aborted_from_waiting() {
    let mut s = sched(cfg(64, 1), 32, 4, true);
    s.add(req(1, prompt(3, 1), 10)).unwrap();
    s.add(req(2, prompt(3, 2), 10)).unwrap();
    step(&mut s, 5);
    assert_eq!(s.num_waiting(), 1);
    s.finish(RequestId(2), FinishReason::Abort);
    assert_eq!(s.num_waiting(), 0);
    assert_eq!(s.get(RequestId(2)).unwrap().status, Status::Finished(FinishReason::Abort));
    ok(&s);
}

// ---------------------------------------------------------------- finish reasons

#[test]
fn stop_ids_and_max_tokens_finish_requests() {
    let mut s = sched(cfg(64, 8), 32, 4, true);
    s.add(req(1, prompt(3, 1), 3)).unwrap();
    s.add(req(2, prompt(3, 2), 10)).unwrap();
    let plan = s.schedule();
    let fin = s.update(&plan, &[Sampled::one(7), Sampled::one(EOS)]);
    assert_eq!(fin, vec![(RequestId(2), FinishReason::Stop)]);
    assert_eq!(s.get(RequestId(2)).unwrap().output, Vec::<u32>::new(), "the stop id is not an output token");
    let (_, f2) = step(&mut s, 7);
    assert!(f2.is_empty());
    let (_, f3) = step(&mut s, 7);
    assert_eq!(f3, vec![(RequestId(1), FinishReason::Length)]);
    assert_eq!(s.get(RequestId(1)).unwrap().output, vec![7, 7, 7]);
    assert_eq!(s.blocks.n_used(), 0);

    // The context length ends a request too.
    let mut c = cfg(64, 8);
    c.max_model_len = 6;
    c.max_prompt_len = 5;
    let mut s = sched(c, 32, 4, true);
    s.add(req(1, prompt(4, 1), 100)).unwrap();
    step(&mut s, 7);
    let (_, fin) = step(&mut s, 7);
    assert_eq!(fin, vec![(RequestId(1), FinishReason::Length)]);
    assert_eq!(s.get(RequestId(1)).unwrap().num_tokens(), 6);
}

// ---------------------------------------------------------------- preemption

#[test]
fn preemption_picks_the_newest_and_the_victim_recomputes_its_output() {
    // 6 blocks of 4: two 8-token prompts fill 3 blocks each at 12 tokens; the
    // 13th token of the older one needs a 7th block.
    let mut s = sched(cfg(64, 8), 6, 4, false);
    s.add(req(1, prompt(8, 1), 12)).unwrap();
    s.add(req(2, prompt(8, 2), 12)).unwrap();
    let mut preempted_at = None;
    for i in 0..20 {
        let (plan, _) = step(&mut s, 5);
        if !plan.preempted.is_empty() {
            assert_eq!(plan.preempted, vec![RequestId(2)], "the newest is the victim");
            assert!(entry(&plan, 2).is_none(), "the victim is not in the plan");
            assert_eq!(entry(&plan, 1).map(|e| (e.start, e.len)), Some((12, 1)));
            preempted_at = Some(i);
            break;
        }
    }
    assert!(preempted_at.is_some(), "no preemption happened");
    let b = s.get(RequestId(2)).unwrap();
    assert_eq!(b.status, Status::Preempted);
    assert_eq!(b.num_computed, 0);
    assert!(b.blocks.table.is_empty());
    assert_eq!(b.preemptions, 1);
    let out_before = b.output.clone();
    assert_eq!(out_before.len(), 5, "prefill sample + 4 decodes before the preemption");
    assert_eq!(s.stats().preemptions, 1);
    assert_eq!(s.num_waiting(), 1);

    // A runs to the end, then B comes back: recomputed from 0, prompt and output.
    let mut resumed = None;
    for _ in 0..40 {
        let (plan, _) = step(&mut s, 6);
        if let Some(e) = entry(&plan, 2) {
            resumed = Some(e.clone());
            break;
        }
        assert!(plan.preempted.is_empty());
    }
    assert_eq!(s.get(RequestId(1)).unwrap().status, Status::Finished(FinishReason::Length));
    let e = resumed.expect("the victim resumed");
    assert_eq!(e, Scheduled { id: RequestId(2), start: 0, len: 8 + out_before.len(), sample: true });
    let b = s.get(RequestId(2)).unwrap();
    assert_eq!(b.num_computed, 8 + out_before.len());
    assert_eq!(&b.output[..out_before.len()], &out_before[..], "output kept across the preemption");
    run_to_end(&mut s, 6, 40);
    let b = s.get(RequestId(2)).unwrap();
    assert_eq!(b.status, Status::Finished(FinishReason::Length));
    assert_eq!(b.output.len(), 12);
    assert_eq!(s.blocks.n_free(), 6);
}

#[test]
fn a_preempted_request_resumes_at_its_own_cached_prefix() {
    // Same as above with prefix caching: the victim's committed blocks are
    // still cached when it comes back, so it restarts at the hit.
    let mut s = sched(cfg(64, 8), 6, 4, true);
    s.add(req(1, prompt(8, 1), 12)).unwrap();
    s.add(req(2, prompt(8, 2), 12)).unwrap();
    let mut out_len = 0;
    for _ in 0..20 {
        let (plan, _) = step(&mut s, 5);
        if plan.preempted == vec![RequestId(2)] {
            out_len = s.get(RequestId(2)).unwrap().output.len();
            break;
        }
    }
    assert!(out_len > 0);
    for _ in 0..40 {
        let (plan, _) = step(&mut s, 6);
        if let Some(e) = entry(&plan, 2) {
            let r = s.get(RequestId(2)).unwrap();
            assert_eq!(e.start, r.cached_tokens);
            assert_eq!(e.start + e.len, 8 + out_len);
            assert!(e.start % 4 == 0 && e.start < 8 + out_len);
            break;
        }
    }
    run_to_end(&mut s, 6, 40);
    assert_eq!(s.get(RequestId(2)).unwrap().output.len(), 12);
}

#[test]
fn a_victim_already_scheduled_in_the_step_is_removed_from_the_plan() {
    // Pool: 4 blocks of 2. A (priority 5) runs first; B (priority 0) joins.
    // In step 3, A's decode fits its block and is scheduled, then B's needs a
    // new block: the victim is A (largest key), already in the plan.
    let mut c = cfg(64, 8);
    c.policy = Policy::Priority;
    let mut s = sched(c, 4, 2, false);
    let mut a = req(1, prompt(2, 1), 6);
    a.priority = 5;
    s.add(a).unwrap();
    step(&mut s, 5); // A: prompt in 1 block, 3 tokens
    let mut b = req(2, prompt(4, 2), 4);
    b.priority = 0;
    s.add(b).unwrap();
    let (p2, _) = step(&mut s, 5); // A writes pos 2 (2nd block), B's prompt takes 2 blocks
    assert_eq!(p2.scheduled.iter().map(|x| x.id.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(s.blocks.n_free(), 0);
    let plan = s.schedule();
    check_plan(&s, &plan);
    assert_eq!(plan.preempted, vec![RequestId(1)], "the priority-5 request goes");
    assert_eq!(plan.scheduled, vec![Scheduled { id: RequestId(2), start: 4, len: 1, sample: true }]);
    assert_eq!(s.get(RequestId(1)).unwrap().status, Status::Preempted);
    s.update(&plan, &tokens_for(&plan, 5));
    ok(&s);
    assert_eq!(s.get(RequestId(1)).unwrap().output.len(), 2, "the victim's entry was not applied");
    run_to_end(&mut s, 5, 100);
    for (id, n) in [(1, 6), (2, 4)] {
        let r = s.get(RequestId(id)).unwrap();
        assert_eq!((r.status, r.output.len()), (Status::Finished(FinishReason::Length), n));
    }
    assert_eq!(s.stats().preemptions, 1);
}

#[test]
fn a_request_longer_than_the_pool_ends_instead_of_preempting_itself_forever() {
    // max_model_len (8192) is far beyond the pool (4 blocks of 2 = 8 tokens).
    for caching in [false, true] {
        let mut s = sched(cfg(64, 8), 4, 2, caching);
        s.add(req(1, prompt(3, 1), 100)).unwrap();
        run_to_end(&mut s, 5, 50);
        let r = s.get(RequestId(1)).unwrap();
        assert_eq!((r.status, r.num_tokens(), r.preemptions), (Status::Finished(FinishReason::Length), 8, 0));
        assert_eq!(s.blocks.n_free(), 4);
    }
}

// ---------------------------------------------------------------- policy

#[test]
fn priority_policy_admits_lower_values_first() {
    // (policy, expected admission order) for priorities 5, 1, 3 added in that order.
    let table: &[(Policy, [u64; 3])] = &[(Policy::Priority, [2, 3, 1]), (Policy::Fcfs, [1, 2, 3])];
    for (policy, order) in table {
        let (policy, order) = (policy.clone(), *order);
        let mut c = cfg(64, 1);
        c.policy = policy.clone();
        let mut s = sched(c, 32, 4, true);
        for (id, prio) in [(1u64, 5), (2, 1), (3, 3)] {
            let mut r = req(id, prompt(3, id as u32), 2);
            r.priority = prio;
            s.add(r).unwrap();
        }
        let mut admitted = Vec::new();
        for _ in 0..20 {
            let (plan, _) = step(&mut s, 5);
            for e in &plan.scheduled {
                if e.start == 0 {
                    admitted.push(e.id.0);
                }
            }
        }
        assert_eq!(admitted, order.to_vec(), "{policy:?}");
    }
}

#[test]
fn equal_priorities_fall_back_to_arrival() {
    let mut c = cfg(64, 1);
    c.policy = Policy::Priority;
    let mut s = sched(c, 32, 4, true);
    for id in [7u64, 3, 9] {
        let mut r = req(id, prompt(3, id as u32), 1);
        r.priority = -1;
        s.add(r).unwrap();
    }
    let mut order = Vec::new();
    for _ in 0..3 {
        let (plan, _) = step(&mut s, 5);
        order.extend(plan.scheduled.iter().map(|e| e.id.0));
    }
    assert_eq!(order, vec![7, 3, 9]);
}

// ---------------------------------------------------------------- prefix cache

#[test]
fn an_identical_prompt_starts_at_the_prefix_hit() {
    // (prompt length, block size, expected hit)
    let table: &[(usize, usize, usize)] = &[(10, 4, 8), (12, 4, 8), (13, 4, 12), (3, 4, 0), (33, 16, 32), (32, 16, 16)];
    for &(n, bs, hit) in table {
        let mut s = sched(cfg(512, 8), 32, bs, true);
        let p = prompt(n, 1);
        s.add(req(1, p.clone(), 5)).unwrap();
        step(&mut s, 5); // prefill + commit
        s.add(req(2, p.clone(), 2)).unwrap();
        let (plan, _) = step(&mut s, 5);
        let e = entry(&plan, 2).expect("admitted");
        assert_eq!(e.start, hit, "prompt {n} bs {bs}");
        assert_eq!(e.start + e.len, n);
        assert!(e.sample);
        assert_eq!(s.get(RequestId(2)).unwrap().cached_tokens, hit);
        let st = s.stats();
        assert_eq!(st.prefix_hit_tokens, hit as u64);
        assert_eq!(st.prefix_queried_tokens, 2 * n as u64);
        // The shared blocks are held by both.
        let (a, b) = (s.get(RequestId(1)).unwrap(), s.get(RequestId(2)).unwrap());
        assert_eq!(a.blocks.table[..hit / bs], b.blocks.table[..hit / bs]);
        run_to_end(&mut s, 5, 20);
        assert_eq!(s.blocks.n_free(), 32);
    }
}

#[test]
fn a_prefix_hit_survives_the_first_request_finishing() {
    let mut s = sched(cfg(512, 8), 16, 4, true);
    let p = prompt(9, 4);
    s.add(req(1, p.clone(), 1)).unwrap();
    let (_, fin) = step(&mut s, 5);
    assert_eq!(fin, vec![(RequestId(1), FinishReason::Length)]);
    assert_eq!(s.blocks.n_free(), 16);
    s.add(req(2, p, 1)).unwrap();
    let (plan, _) = step(&mut s, 5);
    assert_eq!(plan.scheduled, vec![Scheduled { id: RequestId(2), start: 8, len: 1, sample: true }]);
}

#[test]
fn cache_salt_separates_tenants_in_the_scheduler() {
    let mut s = sched(cfg(512, 8), 32, 4, true);
    let p = prompt(9, 4);
    let mut a = req(1, p.clone(), 3);
    a.cache_salt = Some("alice".into());
    let mut b = req(2, p.clone(), 3);
    b.cache_salt = Some("bob".into());
    let mut c = req(3, p, 3);
    c.cache_salt = Some("alice".into());
    s.add(a).unwrap();
    step(&mut s, 5);
    s.add(b).unwrap();
    s.add(c).unwrap();
    let (plan, _) = step(&mut s, 5);
    assert_eq!(entry(&plan, 2).unwrap().start, 0, "another tenant: no hit");
    assert_eq!(entry(&plan, 3).unwrap().start, 8, "same tenant: hit");
}

// ---------------------------------------------------------------- remote KV

#[test]
fn remote_kv_reserves_blocks_then_decodes() {
    let mut s = sched(cfg(64, 8), 8, 4, true);
    let p = prompt(10, 3);
    let (table, cached) = s.add_remote(req(1, p.clone(), 3)).unwrap();
    assert_eq!(table.len(), 3, "10 tokens in blocks of 4");
    assert_eq!(cached, 0, "nothing cached yet");
    assert_eq!(s.blocks.n_free(), 5);
    let r = s.get(RequestId(1)).unwrap();
    assert_eq!(r.status, Status::WaitingForRemoteKv);
    assert_eq!(r.blocks.table, table);
    ok(&s);
    // Waiting for KV: never scheduled, and not a preemption victim.
    for _ in 0..3 {
        let plan = s.schedule();
        assert!(plan.is_empty(), "{plan:?}");
    }
    // A local request runs meanwhile.
    s.add(req(2, prompt(4, 4), 2)).unwrap();
    let (plan, _) = step(&mut s, 5);
    assert!(entry(&plan, 1).is_none());
    assert!(entry(&plan, 2).is_some());

    // Errors: unknown id, or not waiting.
    assert!(matches!(s.remote_kv_ready(RequestId(99), 5), Err(EngineError::InvalidRequest(_))));
    assert!(matches!(s.remote_kv_ready(RequestId(2), 5), Err(EngineError::InvalidRequest(_))));

    assert_eq!(s.remote_kv_ready(RequestId(1), 42).unwrap(), None);
    let r = s.get(RequestId(1)).unwrap();
    assert_eq!((r.status, r.num_computed, r.output.clone()), (Status::Running, 10, vec![42]));
    assert!(matches!(s.remote_kv_ready(RequestId(1), 5), Err(EngineError::InvalidRequest(_))), "only once");
    let (plan, _) = step(&mut s, 5);
    assert_eq!(entry(&plan, 1), Some(&Scheduled { id: RequestId(1), start: 10, len: 1, sample: true }));
    // The received prompt is now in the prefix cache.
    s.add(req(3, p, 1)).unwrap();
    let (plan, _) = step(&mut s, 5);
    assert_eq!(entry(&plan, 3).unwrap().start, 8);
    run_to_end(&mut s, 5, 20);
    assert_eq!(s.blocks.n_free(), 8);
}

#[test]
fn a_remote_request_reuses_the_cached_blocks_of_its_prefix_and_only_the_rest_is_reserved() {
    let mut s = sched(cfg(64, 8), 8, 4, true);
    let p = prompt(13, 3);
    let (first, cached) = s.add_remote(req(1, p.clone(), 2)).unwrap();
    assert_eq!((first.len(), cached), (4, 0));
    assert_eq!(s.remote_kv_ready(RequestId(1), 42).unwrap(), None);
    run_to_end(&mut s, 5, 20);
    assert_eq!(s.blocks.n_free(), 8, "finished; its full blocks stay cached");

    // The same prompt again: its 3 full blocks are cached (the 4th holds the last
    // prompt token, whose KV always travels); one block is newly taken.
    let (again, cached) = s.add_remote(req(2, p.clone(), 2)).unwrap();
    assert_eq!(cached, 3);
    assert_eq!(again[..3], first[..3], "the cached blocks themselves");
    assert_eq!(s.blocks.n_free(), 4, "4 blocks held: 3 cached, 1 new");
    assert_eq!(s.remote_kv_ready(RequestId(2), 42).unwrap(), None);
    run_to_end(&mut s, 5, 20);

    // A prompt sharing the first 8 tokens: 2 blocks; another tenant's: none.
    let mut q = p[..8].to_vec();
    q.extend(prompt(6, 9));
    let (_, cached) = s.add_remote(req(3, q.clone(), 2)).unwrap();
    assert_eq!(cached, 2);
    s.finish(RequestId(3), FinishReason::Abort);
    let mut other = req(4, p.clone(), 2);
    other.cache_salt = Some("another tenant".into());
    let (_, cached) = s.add_remote(other).unwrap();
    assert_eq!(cached, 0);
    s.finish(RequestId(4), FinishReason::Abort);
    assert_eq!(s.blocks.n_free(), 8);

    // Refused for room: the hit's blocks are let go again.
    let mut t = sched(cfg(64, 8), 6, 4, true);
    t.add_remote(req(1, p.clone(), 2)).unwrap();
    t.remote_kv_ready(RequestId(1), 42).unwrap();
    run_to_end(&mut t, 5, 20);
    t.add(req(2, prompt(5, 7), 4)).unwrap();
    step(&mut t, 5);
    let held = 6 - t.blocks.n_free();
    assert_eq!(held, 2, "the local request holds its 2 blocks");
    let mut longer = p.clone();
    longer.extend(prompt(8, 8));
    assert!(matches!(t.add_remote(req(3, longer, 2)), Err(EngineError::OutOfBlocks(_))));
    assert!(t.get(RequestId(3)).is_none());
    assert_eq!(6 - t.blocks.n_free(), held, "nothing more held after the refusal");
    ok(&t);
}

#[test]
fn remote_kv_errors() {
    let mut s = sched(cfg(64, 8), 2, 4, true);
    // More blocks than free: OutOfBlocks, nothing reserved.
    assert!(matches!(s.add_remote(req(1, prompt(7, 1), 3)), Ok(_)));
    assert!(matches!(s.add_remote(req(2, prompt(7, 2), 3)), Err(EngineError::OutOfBlocks(_))));
    assert!(s.get(RequestId(2)).is_none());
    ok(&s);
    // A first token that is a stop id finishes it at once and frees its blocks.
    assert_eq!(s.remote_kv_ready(RequestId(1), EOS).unwrap(), Some(FinishReason::Stop));
    assert_eq!(s.blocks.n_free(), 2);
    // Aborting while waiting for KV frees the reservation.
    s.add_remote(req(3, prompt(7, 3), 3)).unwrap();
    s.finish(RequestId(3), FinishReason::Abort);
    assert_eq!(s.blocks.n_free(), 2);
    assert!(!s.has_unfinished());
    ok(&s);
}

// ---------------------------------------------------------------- parallel sampling

#[test]
fn a_fork_shares_blocks_and_copies_the_partial_block_on_write() {
    // (prompt length, copies expected in the next plan)
    let table: &[(usize, usize)] = &[(6, 1), (8, 0), (5, 1), (4, 0)];
    for &(n, copies) in table {
        let mut s = sched(cfg(64, 8), 16, 4, true);
        s.add(req(1, prompt(n, 1), 5)).unwrap();
        let plan = s.schedule();
        let fin = s.update(&plan, &[Sampled { token: 100, forks: vec![(RequestId(10), 200), (RequestId(11), 201)] }]);
        assert!(fin.is_empty());
        ok(&s);
        let (p, c1, c2) = (s.get(RequestId(1)).unwrap(), s.get(RequestId(10)).unwrap(), s.get(RequestId(11)).unwrap());
        assert_eq!((p.output.clone(), c1.output.clone(), c2.output.clone()), (vec![100], vec![200], vec![201]));
        assert_eq!((c1.status, c1.num_computed, c1.prompt.clone()), (Status::Running, n, p.prompt.clone()));
        assert_eq!(c1.blocks.table, p.blocks.table, "children share the parent's blocks");
        for &b in &p.blocks.table {
            assert_eq!(s.blocks.ref_count(b), 3);
        }
        let shared = p.blocks.table.clone();

        let plan = s.schedule();
        check_plan(&s, &plan);
        assert_eq!(plan.scheduled.len(), 3);
        for e in &plan.scheduled {
            assert_eq!((e.start, e.len, e.sample), (n, 1, true));
        }
        // Prompt ends mid-block: the two first writers of the shared block copy it.
        assert_eq!(plan.copies.len(), 2 * copies, "prompt {n}");
        for &(from, to) in &plan.copies {
            assert_eq!(from, shared[n / 4]);
            assert_eq!(s.blocks.ref_count(to), 1);
        }
        let tables: Vec<_> = [1, 10, 11].iter().map(|&i| s.get(RequestId(i)).unwrap().blocks.table.clone()).collect();
        // Full blocks before the write stay shared; the written block is private to each.
        for t in &tables {
            assert_eq!(t[..n / 4], shared[..n / 4]);
            assert_eq!(s.blocks.ref_count(t[n / 4]), 1);
        }
        assert!(tables[0][n / 4] != tables[1][n / 4] && tables[1][n / 4] != tables[2][n / 4]);
        s.update(&plan, &tokens_for(&plan, 7));
        ok(&s);
        // The next plan copies nothing.
        let (plan, _) = step(&mut s, 7);
        assert!(plan.copies.is_empty());
        run_to_end(&mut s, 7, 20);
        assert_eq!(s.blocks.n_free(), 16);
    }
}

#[test]
fn forked_children_obey_max_seqs() {
    let mut s = sched(cfg(64, 2), 32, 4, true);
    s.add(req(1, prompt(6, 1), 4)).unwrap();
    let plan = s.schedule();
    s.update(&plan, &[Sampled { token: 100, forks: (10..14).map(|i| (RequestId(i), 200)).collect() }]);
    assert_eq!(s.num_running(), 5);
    for _ in 0..40 {
        if !s.has_unfinished() {
            break;
        }
        let (plan, _) = step(&mut s, 7);
        assert!(plan.scheduled.len() <= 2, "{plan:?}");
    }
    assert!(!s.has_unfinished());
    for id in [1, 10, 11, 12, 13] {
        assert_eq!(s.get(RequestId(id)).unwrap().status, Status::Finished(FinishReason::Length));
    }
}

#[test]
fn a_fork_with_a_taken_id_is_ignored_and_a_stopping_parent_still_forks() {
    let mut s = sched(cfg(64, 8), 16, 4, true);
    s.add(req(1, prompt(6, 1), 4)).unwrap();
    s.add(req(2, prompt(6, 2), 4)).unwrap();
    let plan = s.schedule();
    let fin =
        s.update(&plan, &[Sampled { token: EOS, forks: vec![(RequestId(2), 9), (RequestId(3), 9)] }, Sampled::one(5)]);
    assert_eq!(fin, vec![(RequestId(1), FinishReason::Stop)]);
    assert_eq!(s.get(RequestId(2)).unwrap().output, vec![5], "existing id untouched");
    let c = s.get(RequestId(3)).unwrap();
    assert_eq!((c.status, c.output.clone()), (Status::Running, vec![9]));
    ok(&s);
    run_to_end(&mut s, 5, 20);
    assert_eq!(s.blocks.n_free(), 16);
}

// ---------------------------------------------------------------- admission

#[test]
fn admission_errors() {
    let mut c = cfg(64, 8);
    c.max_prompt_len = 20;
    c.max_model_len = 24;
    c.max_waiting = 2;
    let mut s = sched(c, 4, 4, true); // the pool holds 16 tokens

    let kind = |r: Result<(), EngineError>| r.map_err(|e| e.kind());
    assert_eq!(kind(s.add(req(1, vec![], 4))), Err("invalid_request"), "empty prompt");
    assert_eq!(kind(s.add(req(2, prompt(21, 1), 4))), Err("invalid_request"), "longer than max_prompt_len");
    assert_eq!(
        kind(s.add(req(3, prompt(16, 1), 4))),
        Err("invalid_request"),
        "no room in the pool for one output token"
    );
    assert_eq!(kind(s.add(req(4, prompt(15, 1), 4))), Ok(()), "15 + 1 fits the pool");
    assert_eq!(kind(s.add(req(4, prompt(3, 1), 4))), Err("invalid_request"), "duplicate id");
    assert_eq!(kind(s.add(req(5, prompt(3, 1), 4))), Ok(()));
    assert_eq!(kind(s.add(req(6, prompt(3, 1), 4))), Err("overloaded"), "max_waiting reached");
    assert!(matches!(s.add(req(6, prompt(3, 1), 4)), Err(EngineError::Overloaded(_))));
    assert!(s.get(RequestId(6)).is_none());
    // Admitting frees waiting slots.
    step(&mut s, 5);
    assert!(s.num_waiting() < 2);
    assert_eq!(kind(s.add(req(6, prompt(3, 1), 4))), Ok(()));

    // max_model_len: the prompt must leave room for one token.
    let mut c = cfg(64, 8);
    c.max_prompt_len = 100;
    c.max_model_len = 10;
    let mut s = sched(c, 16, 4, true);
    assert!(matches!(s.add(req(1, prompt(10, 1), 4)), Err(EngineError::InvalidRequest(_))));
    assert!(s.add(req(1, prompt(9, 1), 4)).is_ok());
    // add_remote goes through the same checks.
    assert!(matches!(s.add_remote(req(2, vec![], 4)), Err(EngineError::InvalidRequest(_))));
    assert!(matches!(s.add_remote(req(1, prompt(3, 1), 4)), Err(EngineError::InvalidRequest(_))));
}

#[test]
fn max_tokens_zero_still_produces_one_token() {
    let mut s = sched(cfg(64, 8), 8, 4, true);
    s.add(req(1, prompt(3, 1), 0)).unwrap();
    let (_, fin) = step(&mut s, 5);
    assert_eq!(fin, vec![(RequestId(1), FinishReason::Length)]);
    assert_eq!(s.get(RequestId(1)).unwrap().output, vec![5]);
}

#[test]
fn kv_waste_and_step_stats() {
    let mut s = sched(cfg(64, 8), 16, 4, true);
    s.add(req(1, prompt(5, 1), 2)).unwrap();
    let (plan, _) = step(&mut s, 5);
    assert_eq!(plan.num_tokens(), 5);
    let st = s.stats();
    assert_eq!((st.steps, st.scheduled_tokens), (1, 5));
    // 2 blocks of 4 = 8 slots for 5 tokens: 3/8 wasted.
    assert!((st.kv_waste_sum - 3.0 / 8.0).abs() < 1e-9, "{st:?}");
    assert!((st.mean_kv_waste() - 3.0 / 8.0).abs() < 1e-9);
    assert_eq!((st.running, st.waiting, st.blocks_total), (1, 0, 16));
}
