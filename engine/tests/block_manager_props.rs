//! Property tests: random operation sequences against `BlockManager` and
//! `Scheduler`, checking invariants after every operation.
//!
//! The block-manager test keeps a shadow of the KV memory: every slot records
//! (tenant, position, token) of what was written into it, copies are applied
//! as `prepare_write` returns them, and newly allocated blocks hold garbage.
//! So a prefix hit that serves the wrong KV, a write into a shared block, or a
//! block handed to two owners shows up as a content mismatch.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use tandem_engine::block_manager::{prefix_hashes, BlockManager, KvEvent, SeqBlocks, SeqHash};
use tandem_engine::kv_cache::BlockId;
use tandem_engine::scheduler::{NewRequest, Policy, RequestId, Sampled, Scheduler, SchedulerConfig, Status, StepPlan};
use tandem_engine::{EngineError, FinishReason};

// ============================================================ BlockManager

const SALTS: [Option<&str>; 3] = [None, Some("a"), Some("b")];

/// What a KV slot holds: (tenant index, position, token).
type Slot = Option<(u8, usize, u32)>;

#[derive(Debug, Clone)]
enum Op {
    /// Lookup, take the hit, then compute `chunk` more tokens.
    New {
        tokens: Vec<u32>,
        salt: u8,
        chunk: usize,
    },
    /// Compute up to `n` more tokens (appending `more` first if everything is computed).
    Compute {
        who: usize,
        n: usize,
        more: Vec<u32>,
    },
    Fork {
        who: usize,
    },
    /// A bare `prepare_write` at a random position of the table.
    Write {
        who: usize,
        pos: usize,
    },
    Free {
        who: usize,
    },
    /// A lookup that takes nothing.
    Probe {
        tokens: Vec<u32>,
        salt: u8,
    },
}

fn tokens(max: usize) -> impl Strategy<Value = Vec<u32>> {
    // A two-letter alphabet and tiny blocks: prefixes repeat all the time.
    prop::collection::vec(0u32..2, 1..=max)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (tokens(12), 0u8..3, 0usize..14).prop_map(|(tokens, salt, chunk)| Op::New { tokens, salt, chunk }),
        5 => (any::<usize>(), 1usize..6, tokens(3)).prop_map(|(who, n, more)| Op::Compute { who, n, more }),
        2 => any::<usize>().prop_map(|who| Op::Fork { who }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(who, pos)| Op::Write { who, pos }),
        3 => any::<usize>().prop_map(|who| Op::Free { who }),
        1 => (tokens(12), 0u8..3).prop_map(|(tokens, salt)| Op::Probe { tokens, salt }),
    ]
}

#[derive(Debug, Clone)]
struct Holder {
    seq: SeqBlocks,
    tokens: Vec<u32>,
    computed: usize,
    salt: u8,
}

struct Model {
    bm: BlockManager,
    bs: usize,
    holders: Vec<Holder>,
    kv: Vec<Vec<Slot>>,
    /// Hashes the events say are cached.
    cached: HashSet<SeqHash>,
    queried: u64,
    hit: u64,
}

impl Model {
    fn new(n_blocks: usize, bs: usize, caching: bool) -> Self {
        Model {
            bm: BlockManager::new(n_blocks, bs, caching),
            bs,
            holders: Vec::new(),
            kv: vec![vec![None; bs]; n_blocks],
            cached: HashSet::new(),
            queried: 0,
            hit: 0,
        }
    }

    fn salt(i: u8) -> Option<&'static str> {
        SALTS[i as usize]
    }

    /// Lookup with every check a hit must pass.
    fn lookup(&mut self, tokens: &[u32], salt: u8) -> tandem_engine::block_manager::PrefixHit {
        let hit = self.bm.lookup_prefix(tokens, Self::salt(salt));
        let bs = self.bs;
        if self.bm.prefix_caching() {
            self.queried += tokens.len() as u64;
            self.hit += hit.tokens(bs) as u64;
        } else {
            assert!(hit.blocks.is_empty());
        }
        assert_eq!(hit.blocks.len(), hit.hashes.len());
        assert!(hit.tokens(bs) < tokens.len(), "a hit leaves the last token uncached");
        let want = prefix_hashes(tokens, bs, Self::salt(salt));
        assert_eq!(hit.hashes[..], want[..hit.hashes.len()], "hit hashes are the prompt's chain");
        for (i, (&b, h)) in hit.blocks.iter().zip(&hit.hashes).enumerate() {
            assert!(self.cached.contains(h), "hit on a hash never announced as stored: {h:?}");
            for j in 0..bs {
                let p = i * bs + j;
                assert_eq!(
                    self.kv[b.0 as usize][j],
                    Some((salt, p, tokens[p])),
                    "hit block {b:?} does not hold the KV of position {p} for this tenant"
                );
            }
        }
        hit
    }

    fn garbage_new_blocks(&mut self, seq: &SeqBlocks, from: usize) {
        for &b in &seq.table[from..] {
            self.kv[b.0 as usize] = vec![None; self.bs];
        }
    }

    fn apply_copy(&mut self, copy: Option<(BlockId, BlockId)>) {
        if let Some((from, to)) = copy {
            assert_ne!(from, to);
            assert_eq!(self.bm.ref_count(to), 1, "a copy target is private");
            self.kv[to.0 as usize] = self.kv[from.0 as usize].clone();
        }
    }

    /// Computes up to `n` more tokens of holder `w`, as the engine would.
    fn compute(&mut self, w: usize, n: usize) {
        let bs = self.bs;
        let mut h = self.holders[w].clone();
        let target = (h.computed + n).min(h.tokens.len());
        if target == h.computed {
            return;
        }
        let (before, free) = (h.seq.clone(), self.bm.n_free());
        let need = self.bm.blocks_needed(&h.seq, target);
        match self.bm.allocate(&mut h.seq, target) {
            Ok(()) => {
                assert_eq!(self.bm.n_free(), free - need);
                self.garbage_new_blocks(&h.seq, before.table.len());
            }
            Err(e) => {
                assert!(matches!(e, EngineError::OutOfBlocks(_)));
                assert!(need > free);
                assert_eq!((&h.seq, self.bm.n_free()), (&before, free), "all or nothing");
                return;
            }
        }
        // Copy-on-write every block about to be written.
        let mut idx = h.computed / bs;
        while idx * bs < target {
            let pos = (idx * bs).max(h.computed);
            match self.bm.prepare_write(&mut h.seq, pos) {
                Ok(c) => self.apply_copy(c),
                Err(_) => {
                    // Out of blocks for the copy: the write does not happen.
                    self.holders[w] = h;
                    return;
                }
            }
            idx += 1;
        }
        for p in h.computed..target {
            let b = h.seq.table[p / bs];
            assert_eq!(self.bm.ref_count(b), 1, "writing position {p} into shared block {b:?}");
            self.kv[b.0 as usize][p % bs] = Some((h.salt, p, h.tokens[p]));
        }
        h.computed = target;
        self.bm.commit(&mut h.seq, &h.tokens, h.computed, Self::salt(h.salt));
        assert!(h.seq.num_hashed * bs <= h.computed);
        self.holders[w] = h;
    }

    /// Checks the events since the last call; `committer` is the holder whose commit may have stored.
    fn events(&mut self, committer: Option<usize>) {
        for e in self.bm.take_events() {
            match e {
                KvEvent::Removed { hashes } => {
                    assert!(!hashes.is_empty());
                    for h in hashes {
                        assert!(self.cached.remove(&h), "removed {h:?} that was not stored");
                    }
                }
                KvEvent::Stored { parent, hashes } => {
                    assert!(!hashes.is_empty());
                    let w = committer.expect("only a commit stores");
                    let h = &self.holders[w];
                    let chain = prefix_hashes(&h.tokens[..h.computed], self.bs, Self::salt(h.salt));
                    let start = chain
                        .iter()
                        .position(|x| *x == hashes[0])
                        .unwrap_or_else(|| panic!("stored hash {:?} is not in the committer's chain", hashes[0]));
                    assert_eq!(chain[start..start + hashes.len()], hashes[..], "a stored run is contiguous");
                    let want_parent = if start == 0 { None } else { Some(chain[start - 1]) };
                    assert_eq!(parent, want_parent, "stored run's parent");
                    for h in hashes {
                        assert!(self.cached.insert(h), "stored {h:?} twice");
                    }
                }
            }
        }
    }

    fn check(&self) {
        let refs: Vec<&SeqBlocks> = self.holders.iter().map(|h| &h.seq).collect();
        self.bm.check(&refs).unwrap_or_else(|e| panic!("check: {e}"));
        let n = self.bm.n_blocks();
        let mut count = vec![0u32; n];
        for h in &self.holders {
            let mut own: Vec<BlockId> = h.seq.table.clone();
            own.sort();
            own.dedup();
            assert_eq!(own.len(), h.seq.table.len(), "a block twice in one table");
            for b in &h.seq.table {
                count[b.0 as usize] += 1;
            }
            assert!(h.seq.table.len() * self.bs >= h.computed);
            assert!(h.seq.num_hashed <= h.seq.table.len());
            // Every computed position still holds this holder's KV.
            for p in 0..h.computed {
                let b = h.seq.table[p / self.bs];
                assert_eq!(
                    self.kv[b.0 as usize][p % self.bs],
                    Some((h.salt, p, h.tokens[p])),
                    "holder lost its KV at position {p} (block {b:?})"
                );
            }
        }
        for (i, &c) in count.iter().enumerate() {
            assert_eq!(self.bm.ref_count(BlockId(i as u32)), c, "block {i}: holders vs ref count");
        }
        let used = count.iter().filter(|&&c| c > 0).count();
        assert_eq!(self.bm.n_free() + used, n);
        assert_eq!(self.bm.n_used(), used);
        let st = self.bm.stats();
        assert!(st.hit_tokens <= st.queried_tokens);
        assert_eq!((st.queried_tokens, st.hit_tokens), (self.queried, self.hit));
        assert!(self.cached.len() <= n);
    }

    fn run(&mut self, op: Op) {
        let mut committer = None;
        let pick = |who: usize, len: usize| if len == 0 { None } else { Some(who % len) };
        match op {
            Op::New { tokens, salt, chunk } => {
                let hit = self.lookup(&tokens, salt);
                let mut seq = SeqBlocks::default();
                let (free, cost) = (self.bm.n_free(), self.bm.hit_cost(&hit));
                let hit_tokens = hit.tokens(self.bs);
                self.bm.take_prefix(&mut seq, hit);
                assert_eq!(self.bm.n_free(), free - cost);
                assert_eq!(seq.num_hashed * self.bs, hit_tokens);
                self.holders.push(Holder { seq, tokens, computed: hit_tokens, salt });
                let w = self.holders.len() - 1;
                self.compute(w, chunk);
                committer = Some(w);
            }
            Op::Compute { who, n, more } => {
                if let Some(w) = pick(who, self.holders.len()) {
                    if self.holders[w].computed == self.holders[w].tokens.len() {
                        self.holders[w].tokens.extend(more);
                    }
                    self.compute(w, n);
                    committer = Some(w);
                }
            }
            Op::Fork { who } => {
                if let Some(w) = pick(who, self.holders.len()) {
                    let mut h = self.holders[w].clone();
                    h.seq = self.bm.fork(&self.holders[w].seq);
                    assert_eq!(h.seq, self.holders[w].seq);
                    self.holders.push(h);
                }
            }
            Op::Write { who, pos } => {
                if let Some(w) = pick(who, self.holders.len()) {
                    let mut h = self.holders[w].clone();
                    if !h.seq.table.is_empty() {
                        let pos = pos % (h.seq.table.len() * self.bs);
                        let b = h.seq.table[pos / self.bs];
                        let shared = self.bm.ref_count(b) > 1;
                        match self.bm.prepare_write(&mut h.seq, pos) {
                            Ok(c) => {
                                assert_eq!(c.is_some(), shared, "a copy exactly when shared");
                                self.apply_copy(c);
                                assert_eq!(self.bm.ref_count(h.seq.table[pos / self.bs]), 1);
                                // Rewriting an already computed slot writes the same value.
                                if pos < h.computed {
                                    let nb = h.seq.table[pos / self.bs];
                                    self.kv[nb.0 as usize][pos % self.bs] = Some((h.salt, pos, h.tokens[pos]));
                                }
                            }
                            Err(_) => {
                                assert!(shared && self.bm.n_free() == 0);
                                assert_eq!(h.seq, self.holders[w].seq);
                            }
                        }
                        self.holders[w] = h;
                    }
                }
            }
            Op::Free { who } => {
                if let Some(w) = pick(who, self.holders.len()) {
                    let mut h = self.holders.swap_remove(w);
                    self.bm.free(&mut h.seq);
                    assert_eq!(h.seq, SeqBlocks::default());
                }
            }
            Op::Probe { tokens, salt } => {
                self.lookup(&tokens, salt);
            }
        }
        self.events(committer);
        self.check();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn block_manager_invariants_hold_under_random_operations(
        n_blocks in 4usize..24,
        bs in 1usize..4,
        caching in prop::bool::weighted(0.85),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let mut m = Model::new(n_blocks, bs, caching);
        m.check();
        for op in ops {
            m.run(op);
        }
        // Freeing everything returns every block.
        while let Some(mut h) = m.holders.pop() {
            m.bm.free(&mut h.seq);
            m.check();
        }
        prop_assert_eq!(m.bm.n_free(), n_blocks);
    }
}

// ============================================================ Scheduler

const STOP: u32 = 9;

#[derive(Debug, Clone)]
enum SOp {
    /// `cut` picks the prompt length over the admissible range (0 and one-too-long included).
    Add {
        prompt: Vec<u32>,
        cut: usize,
        max_tokens: usize,
        priority: i32,
        salt: u8,
    },
    /// One step; `draws` drive the sampled tokens, stops, forks and mid-step aborts.
    Step {
        draws: Vec<u32>,
    },
    Abort {
        who: usize,
        take: bool,
    },
}

fn sop() -> impl Strategy<Value = SOp> {
    prop_oneof![
        3 => (prop::collection::vec(0u32..3, 48), any::<usize>(), 1usize..10, 0i32..3, 0u8..3)
            .prop_map(|(prompt, cut, max_tokens, priority, salt)| SOp::Add { prompt, cut, max_tokens, priority, salt }),
        6 => prop::collection::vec(any::<u32>(), 8).prop_map(|draws| SOp::Step { draws }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(who, take)| SOp::Abort { who, take }),
    ]
}

#[derive(Debug, Clone)]
struct SchedCase {
    n_blocks: usize,
    bs: usize,
    budget: usize,
    max_seqs: usize,
    max_waiting: usize,
    policy: Policy,
    caching: bool,
    /// `max_model_len` beyond the pool's capacity (0: the pool holds a full context).
    overhang: usize,
    /// `long_prefill_threshold` and `long_prefill_share`.
    long_prefill: (usize, usize),
}

fn sched_case() -> impl Strategy<Value = SchedCase> {
    (
        (3usize..10, 1usize..6, 1usize..24, 1usize..5),
        (2usize..8, 0u8..4, prop::bool::weighted(0.8), prop_oneof![2 => Just(0usize), 1 => 1usize..40]),
        (1usize..30, 1usize..=100),
    )
        .prop_map(|((n_blocks, bs, budget, max_seqs), (max_waiting, prio, caching, overhang), long_prefill)| {
            SchedCase {
                n_blocks,
                bs,
                budget,
                max_seqs,
                max_waiting,
                policy: [Policy::Fcfs, Policy::Priority, Policy::Fair, Policy::Sjf][prio as usize].clone(),
                caching,
                overhang,
                long_prefill,
            }
        })
}

struct SchedModel {
    s: Scheduler,
    cfg: SchedCase,
    /// Every id the scheduler accepted (added or forked), and whether it was taken out.
    known: Vec<RequestId>,
    taken: HashSet<RequestId>,
    next_id: u64,
    steps: u64,
    /// The scheduler's clock (ms), moved every step.
    clock: u64,
}

impl SchedModel {
    fn new(c: SchedCase) -> Self {
        let pool = c.n_blocks * c.bs;
        let cfg = SchedulerConfig {
            max_batched_tokens: c.budget,
            max_seqs: c.max_seqs,
            max_waiting: c.max_waiting,
            // Usually the pool holds a full context; sometimes the context is longer
            // than the pool, and a lone request must still finish.
            max_model_len: pool + c.overhang,
            max_prompt_len: pool - 1,
            policy: c.policy.clone(),
            long_prefill_threshold: c.long_prefill.0,
            long_prefill_share: c.long_prefill.1,
            fair: Default::default(),
            sjf: tandem_engine::share::SjfConfig { aging: 1.0, max_wait_ms: 50 },
        };
        SchedModel {
            s: Scheduler::new(cfg, BlockManager::new(c.n_blocks, c.bs, c.caching)),
            cfg: c,
            known: Vec::new(),
            taken: HashSet::new(),
            next_id: 1,
            clock: 0,
            steps: 0,
        }
    }

    fn check(&self) {
        let holders = self.s.holders();
        self.s.blocks.check(&holders).unwrap_or_else(|e| panic!("check: {e}"));
        let st = self.s.stats();
        assert!(st.prefix_hit_tokens <= st.prefix_queried_tokens);
        assert_eq!(st.blocks_used, self.s.blocks.n_used());
        for &id in &self.known {
            if self.taken.contains(&id) {
                assert!(self.s.get(id).is_none());
                continue;
            }
            let r = self.s.get(id).expect("a known request is never lost");
            assert!(r.num_computed <= r.num_tokens());
            assert!(r.output.len() <= r.max_tokens);
            assert!(r.num_tokens() <= self.s.cfg.max_model_len.min(self.cfg.n_blocks * self.cfg.bs));
            match r.status {
                Status::Finished(_) | Status::Waiting | Status::Preempted => {
                    assert!(r.blocks.table.is_empty(), "{:?} holds blocks while {:?}", id, r.status)
                }
                Status::Running | Status::Frozen => assert!(r.blocks.table.len() * self.cfg.bs >= r.num_computed),
                Status::WaitingForRemoteKv => {}
            }
        }
    }

    fn add(&mut self, mut prompt: Vec<u32>, cut: usize, max_tokens: usize, priority: i32, salt: u8) {
        prompt.truncate(cut % (self.s.cfg.max_prompt_len + 2));
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let waiting = self.s.num_waiting();
        let len = prompt.len();
        let r = self.s.add(NewRequest {
            id,
            prompt,
            max_tokens,
            stop_ids: vec![STOP],
            priority,
            cache_salt: SALTS[salt as usize].map(String::from),
            // Tenants by salt; predicted lengths from the priority (any order will do).
            share: tandem_engine::share::Share {
                tenant: SALTS[salt as usize].map(std::sync::Arc::from),
                predicted_output: Some(priority.unsigned_abs() % 50),
                elsewhere: (priority.unsigned_abs() % 7) as f64 * 10.0,
            },
        });
        match r {
            Ok(()) => {
                assert!(len > 0 && len <= self.s.cfg.max_prompt_len && waiting < self.s.cfg.max_waiting);
                self.known.push(id);
            }
            Err(EngineError::InvalidRequest(_)) => assert!(len == 0 || len > self.s.cfg.max_prompt_len),
            Err(EngineError::Overloaded(_)) => assert!(waiting >= self.s.cfg.max_waiting),
            Err(e) => panic!("unexpected admission error {e:?}"),
        }
    }

    fn check_plan(&self, plan: &StepPlan) {
        let bs = self.cfg.bs;
        assert!(plan.num_tokens() <= self.s.cfg.max_batched_tokens, "budget: {plan:?}");
        assert!(plan.scheduled.len() <= self.s.cfg.max_seqs, "max_seqs {}: {plan:?}", self.s.cfg.max_seqs);
        let mut seen = HashSet::new();
        for sc in &plan.scheduled {
            assert!(seen.insert(sc.id), "scheduled twice: {plan:?}");
            assert!(!plan.preempted.contains(&sc.id));
            let r = self.s.get(sc.id).expect("scheduled request exists");
            assert_eq!(r.status, Status::Running);
            assert!(sc.len > 0);
            assert_eq!(sc.start, r.num_computed);
            assert!(sc.start + sc.len <= r.num_tokens());
            assert_eq!(sc.sample, sc.start + sc.len == r.num_tokens());
            assert!(r.blocks.table.len() * bs >= sc.start + sc.len, "blocks cover the chunk");
            // Every block written this step is private to the request.
            for p in sc.start..sc.start + sc.len {
                let b = r.blocks.table[p / bs];
                assert_eq!(self.s.blocks.ref_count(b), 1, "{:?} writes position {p} into shared block {b:?}", sc.id);
            }
        }
        let mut victims = HashSet::new();
        for id in &plan.preempted {
            assert!(victims.insert(*id), "preempted twice in one step: {plan:?}");
            let r = self.s.get(*id).expect("exists");
            if r.status == Status::Preempted {
                assert_eq!(r.num_computed, 0);
                assert!(r.blocks.table.is_empty());
            }
        }
    }

    /// One schedule + update; returns whether anything was scheduled.
    fn step(&mut self, draws: &[u32], allow_forks: bool) -> bool {
        let mut d = draws.iter().copied().cycle();
        self.clock += 7;
        self.s.set_clock(self.clock);
        let plan = self.s.schedule();
        self.steps += 1;
        self.check_plan(&plan);
        self.check();

        // Occasionally the client of a scheduled request goes away mid-step.
        let mut gone = HashSet::new();
        if !plan.scheduled.is_empty() && d.next().unwrap() % 8 == 0 {
            let victim = plan.scheduled[d.next().unwrap() as usize % plan.scheduled.len()].id;
            self.s.finish(victim, FinishReason::Abort);
            if d.next().unwrap() % 2 == 0 {
                assert!(self.s.take_finished(victim).is_some());
                self.taken.insert(victim);
            }
            gone.insert(victim);
        }

        let mut sampled = Vec::new();
        let mut expect: Vec<(RequestId, u32)> = Vec::new();
        for sc in plan.scheduled.iter().filter(|s| s.sample) {
            let x = d.next().unwrap();
            let token = if x % 11 == 0 { STOP } else { x % 3 };
            let mut forks = Vec::new();
            if allow_forks && x % 13 == 1 {
                for k in 0..(1 + x % 3) {
                    let child = RequestId(self.next_id);
                    self.next_id += 1;
                    forks.push((child, (x / 7 + k) % 3));
                }
            }
            if !gone.contains(&sc.id) {
                expect.push((sc.id, token));
                for &(c, t) in &forks {
                    expect.push((c, t));
                }
            }
            sampled.push(Sampled { token, forks });
        }
        let before: HashMap<RequestId, usize> =
            expect.iter().filter_map(|&(id, _)| self.s.get(id).map(|r| (id, r.output.len()))).collect();
        let finished = self.s.update(&plan, &sampled);
        let fin: HashMap<RequestId, FinishReason> = finished.iter().copied().collect();
        assert_eq!(fin.len(), finished.len(), "finished once");
        for (id, tok) in expect {
            let r = self.s.get(id).expect("sampled request (or fork) exists");
            if !self.known.contains(&id) {
                self.known.push(id); // a fork child
            }
            if tok == STOP {
                assert_eq!(r.status, Status::Finished(FinishReason::Stop), "{id:?} sampled the stop id");
                assert_eq!(fin.get(&id), Some(&FinishReason::Stop));
            } else {
                assert_eq!(r.output.last(), Some(&tok), "{id:?} got someone else's token");
                if let Some(&n) = before.get(&id) {
                    assert_eq!(r.output.len(), n + 1);
                }
                match r.status {
                    Status::Finished(FinishReason::Length) => assert_eq!(fin.get(&id), Some(&FinishReason::Length)),
                    Status::Running => assert!(!fin.contains_key(&id)),
                    s => panic!("{id:?} is {s:?} after sampling"),
                }
            }
        }
        for id in &gone {
            assert!(!fin.contains_key(id), "an aborted request does not finish again");
        }
        self.check();
        !plan.is_empty()
    }

    fn abort(&mut self, who: usize, take: bool) {
        if self.known.is_empty() {
            return;
        }
        let id = self.known[who % self.known.len()];
        if self.taken.contains(&id) {
            return;
        }
        let was_finished = matches!(self.s.get(id).unwrap().status, Status::Finished(_));
        self.s.finish(id, FinishReason::Abort);
        let r = self.s.get(id).unwrap();
        if !was_finished {
            assert_eq!(r.status, Status::Finished(FinishReason::Abort));
        }
        assert!(r.blocks.table.is_empty());
        if take {
            assert!(self.s.take_finished(id).is_some());
            self.taken.insert(id);
        }
        self.check();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn scheduler_invariants_hold_and_every_run_drains(
        case in sched_case(),
        ops in prop::collection::vec(sop(), 1..100),
        tail in prop::collection::vec(any::<u32>(), 8),
    ) {
        let mut m = SchedModel::new(case);
        for op in ops {
            match op {
                SOp::Add { prompt, cut, max_tokens, priority, salt } => m.add(prompt, cut, max_tokens, priority, salt),
                SOp::Step { draws } => { m.step(&draws, true); }
                SOp::Abort { who, take } => m.abort(who, take),
            }
        }
        // Keep stepping without adding: everything must finish (no deadlock, no livelock).
        let limit = 4000;
        let mut idle = 0;
        let mut n = 0u32;
        while m.s.has_unfinished() {
            n += 1;
            prop_assert!(n <= limit, "did not drain in {} steps: running {}, waiting {}", limit, m.s.num_running(), m.s.num_waiting());
            let draws: Vec<u32> = tail.iter().map(|x| x.wrapping_mul(n.wrapping_mul(2_654_435_761)).rotate_left(n % 32)).collect();
            if m.step(&draws, false) { idle = 0 } else { idle += 1 }
            prop_assert!(idle < 3, "unfinished requests but empty plans: a deadlock");
        }
        for &id in &m.known {
            if !m.taken.contains(&id) {
                let r = m.s.get(id).expect("never lost");
                prop_assert!(matches!(r.status, Status::Finished(_)), "{:?} ended {:?}", id, r.status);
            }
        }
        prop_assert_eq!(m.s.blocks.n_free(), m.s.blocks.n_blocks(), "every block returned");
        prop_assert_eq!(m.s.num_running() + m.s.num_waiting(), 0);
    }
}
