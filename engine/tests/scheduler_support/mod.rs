//! What the scheduler's table tests share: configs, requests, prompts, and a step that
//! checks the block invariants after every plan and update.
#![allow(dead_code)] // each test file uses its own part

use tandem_engine::block_manager::BlockManager;
pub use tandem_engine::scheduler::{NewRequest, RequestId, Sampled, Scheduled, Scheduler, SchedulerConfig, StepPlan};
use tandem_engine::FinishReason;

pub const EOS: u32 = 2;

pub fn cfg(budget: usize, max_seqs: usize) -> SchedulerConfig {
    SchedulerConfig { max_batched_tokens: budget, max_seqs, ..SchedulerConfig::default() }
}

pub fn sched(c: SchedulerConfig, n_blocks: usize, bs: usize, caching: bool) -> Scheduler {
    Scheduler::new(c, BlockManager::new(n_blocks, bs, caching))
}

pub fn req(id: u64, prompt: Vec<u32>, max_tokens: usize) -> NewRequest {
    NewRequest {
        id: RequestId(id),
        prompt,
        max_tokens,
        stop_ids: vec![EOS],
        priority: 0,
        cache_salt: None,
        share: Default::default(),
    }
}

/// A prompt of `n` tokens that never contains the stop id; `seed` separates prompts.
pub fn prompt(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 10 + (i * 7 + seed * 1000) % 5000).collect()
}

pub fn ok(s: &Scheduler) {
    s.blocks.check(&s.holders()).unwrap_or_else(|e| panic!("invariant broken: {e}"));
}

pub fn check_plan(s: &Scheduler, plan: &StepPlan) {
    assert!(plan.num_tokens() <= s.cfg.max_batched_tokens, "{plan:?}");
    assert!(plan.scheduled.len() <= s.cfg.max_seqs, "{plan:?}");
    ok(s);
}

/// Samples `tok` for every entry that samples.
pub fn tokens_for(plan: &StepPlan, tok: u32) -> Vec<Sampled> {
    plan.scheduled.iter().filter(|s| s.sample).map(|_| Sampled::one(tok)).collect()
}

/// One schedule + update sampling `tok` for everyone; returns the plan and finished list.
pub fn step(s: &mut Scheduler, tok: u32) -> (StepPlan, Vec<(RequestId, FinishReason)>) {
    let plan = s.schedule();
    check_plan(s, &plan);
    let fin = s.update(&plan, &tokens_for(&plan, tok));
    ok(s);
    (plan, fin)
}

pub fn entry(plan: &StepPlan, id: u64) -> Option<&Scheduled> {
    plan.scheduled.iter().find(|s| s.id == RequestId(id))
}

pub fn run_to_end(s: &mut Scheduler, tok: u32, limit: usize) {
    for _ in 0..limit {
        if !s.has_unfinished() {
            return;
        }
        step(s, tok);
    }
    panic!("did not finish in {limit} steps");
}
