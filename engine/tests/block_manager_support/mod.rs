//! What the block manager's table tests share: the invariant check run after every step
//! and sequences made the way the scheduler makes them.
#![allow(dead_code)] // each test file uses its own part

use tandem_engine::block_manager::{BlockManager, SeqBlocks};
use tandem_engine::kv_cache::BlockId;

/// `check()` and the counts that follow from `holders` being every holder.
pub fn ok(bm: &BlockManager, holders: &[&SeqBlocks]) {
    bm.check(holders).unwrap_or_else(|e| panic!("invariant broken: {e}"));
    let mut held: Vec<BlockId> = holders.iter().flat_map(|s| s.table.iter().copied()).collect();
    held.sort();
    held.dedup();
    assert_eq!(bm.n_free() + held.len(), bm.n_blocks(), "free + held == total");
    assert_eq!(bm.n_used(), held.len());
    let st = bm.stats();
    assert!(st.hit_tokens <= st.queried_tokens, "{st:?}");
}

/// A sequence that looked up its prefix, took the hit, allocated and computed all of `tokens`.
pub fn computed_seq(bm: &mut BlockManager, tokens: &[u32], salt: Option<&str>) -> SeqBlocks {
    let mut s = SeqBlocks::default();
    let hit = bm.lookup_prefix(tokens, salt);
    bm.take_prefix(&mut s, hit);
    bm.allocate(&mut s, tokens.len()).expect("room for the sequence");
    bm.commit(&mut s, tokens, tokens.len(), salt);
    s
}

/// A sequence that allocated and computed `tokens` without looking the prefix up
/// (it was admitted while an identical prompt was still being computed).
pub fn private_seq(bm: &mut BlockManager, tokens: &[u32]) -> SeqBlocks {
    let mut s = SeqBlocks::default();
    bm.allocate(&mut s, tokens.len()).expect("room for the sequence");
    s
}

pub fn toks(range: std::ops::Range<u32>) -> Vec<u32> {
    range.collect()
}
