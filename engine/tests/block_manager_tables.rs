//! Table tests for `BlockManager`: allocation, eviction order, the prefix
//! cache (hits, salts, the uncached last token), KV events, copy-on-write and
//! duplicate computation. `check()` runs after every step. Forged hash
//! collisions, across salts and token ids: `prefix_isolation_tables.rs`.

use tandem_engine::block_manager::{prefix_hashes, BlockManager, KvEvent, PrefixStats, SeqBlocks, SeqHash};
use tandem_engine::kv_cache::BlockId;
use tandem_engine::EngineError;

mod block_manager_support;
use block_manager_support::{computed_seq, ok, private_seq, toks};

// ---------------------------------------------------------------- allocation

#[test]
fn allocation_is_all_or_nothing() {
    // (pool blocks, block size, already taken tokens, request tokens, expect ok)
    let table: &[(usize, usize, usize, usize, bool)] = &[
        (4, 4, 0, 16, true),  // exactly the pool
        (4, 4, 0, 17, false), // one token too many
        (4, 4, 8, 9, true),   // growth of 1 block with 2 free
        (4, 4, 8, 16, true),  // growth to the pool
        (4, 4, 8, 17, false), // growth past the pool
        (4, 4, 5, 8, true),   // growth inside allocated blocks needs nothing
        (1, 16, 0, 16, true),
        (1, 16, 0, 17, false),
        (3, 1, 0, 0, true), // zero tokens: no block
    ];
    for &(n, bs, first, total, expect) in table {
        let mut bm = BlockManager::new(n, bs, true);
        let mut s = SeqBlocks::default();
        bm.allocate(&mut s, first).unwrap();
        let other = SeqBlocks::default();
        let before = (s.clone(), bm.n_free());
        let got = bm.allocate(&mut s, total);
        assert_eq!(got.is_ok(), expect, "n={n} bs={bs} first={first} total={total}: {got:?}");
        if expect {
            assert_eq!(s.table.len(), total.div_ceil(bs).max(first.div_ceil(bs)));
            assert_eq!(bm.blocks_needed(&s, total), 0);
        } else {
            assert!(matches!(got, Err(EngineError::OutOfBlocks(_))), "{got:?}");
            assert_eq!((s.clone(), bm.n_free()), before, "a failed allocation changes nothing");
        }
        for &b in &s.table {
            assert_eq!(bm.ref_count(b), 1);
        }
        ok(&bm, &[&s, &other]);
        bm.free(&mut s);
        assert_eq!(s, SeqBlocks::default());
        assert_eq!(bm.n_free(), n);
        ok(&bm, &[]);
    }
}

#[test]
fn failed_allocation_does_not_evict_cached_blocks() {
    let mut bm = BlockManager::new(4, 2, true);
    let t = toks(0..5);
    let mut a = computed_seq(&mut bm, &t, None);
    bm.free(&mut a);
    bm.take_events();
    let mut b = SeqBlocks::default();
    assert!(bm.allocate(&mut b, 9).is_err());
    assert!(bm.take_events().is_empty(), "nothing evicted by a refused allocation");
    assert_eq!(bm.lookup_prefix(&t, None).blocks.len(), 2);
    ok(&bm, &[&b]);
}

// ---------------------------------------------------------------- eviction order

#[test]
fn uncached_freed_blocks_are_reused_before_cached_ones() {
    let mut bm = BlockManager::new(4, 2, true);
    let ta = toks(0..4); // 2 full blocks, cached
    let mut a = computed_seq(&mut bm, &ta, None);
    let mut b = private_seq(&mut bm, &[7, 7, 7, 7]); // 2 blocks, never committed
    ok(&bm, &[&a, &b]);
    let (a_blocks, b_blocks) = (a.table.clone(), b.table.clone());
    bm.free(&mut a); // cached: to the back
    bm.free(&mut b); // uncached: to the front, even though released later
    ok(&bm, &[]);
    bm.take_events();

    let mut c = SeqBlocks::default();
    bm.allocate(&mut c, 4).unwrap();
    let mut got = c.table.clone();
    got.sort();
    let mut want = b_blocks.clone();
    want.sort();
    assert_eq!(got, want, "the uncached blocks go first");
    assert!(bm.take_events().is_empty(), "no cached block evicted yet");
    // The cached prefix still hits: lookup of 4 tokens + 1 covers both blocks.
    let hit = bm.lookup_prefix(&[0, 1, 2, 3, 9], None);
    assert_eq!(hit.blocks, a_blocks);
    ok(&bm, &[&c]);
}

#[test]
fn cached_blocks_are_evicted_least_recently_released_first_tail_before_root() {
    let mut bm = BlockManager::new(6, 2, true);
    let (ta, tb) = (toks(0..6), toks(100..106)); // 3 full blocks each
    let mut a = computed_seq(&mut bm, &ta, None);
    let mut b = computed_seq(&mut bm, &tb, None);
    let (a_blocks, b_blocks) = (a.table.clone(), b.table.clone());
    let (ha, hb) = (prefix_hashes(&ta, 2, None), prefix_hashes(&tb, 2, None));
    bm.free(&mut a); // released first
    bm.free(&mut b);
    ok(&bm, &[]);
    bm.take_events();

    // Expected eviction order: A's tail..root, then B's tail..root.
    let order: Vec<(BlockId, SeqHash)> =
        a_blocks.iter().zip(&ha).rev().chain(b_blocks.iter().zip(&hb).rev()).map(|(&b, &h)| (b, h)).collect();
    let mut holders: Vec<SeqBlocks> = Vec::new();
    for (i, &(block, hash)) in order.iter().enumerate() {
        let mut s = SeqBlocks::default();
        bm.allocate(&mut s, 1).unwrap();
        assert_eq!(s.table, vec![block], "eviction #{i}");
        assert_eq!(bm.take_events(), vec![KvEvent::Removed { hashes: vec![hash] }], "eviction #{i}");
        holders.push(s);
        let refs: Vec<&SeqBlocks> = holders.iter().collect();
        ok(&bm, &refs);
        // The rest of A's prefix (root side) still hits while its tail is gone.
        if i < 3 {
            let remaining = 2 - i;
            let mut probe = ta.clone();
            probe.push(42);
            assert_eq!(
                bm.lookup_prefix(&probe, None).blocks,
                a_blocks[..remaining].to_vec(),
                "after {} evictions",
                i + 1
            );
        }
    }
    assert_eq!(bm.n_free(), 0);
}

#[test]
fn reused_block_released_again_goes_to_the_back_only_if_cached() {
    // A block that was cached, evicted, reused for private data and freed is uncached again.
    let mut bm = BlockManager::new(2, 2, true);
    let mut a = computed_seq(&mut bm, &[1, 2], None);
    bm.free(&mut a);
    let mut b = SeqBlocks::default();
    bm.allocate(&mut b, 4).unwrap(); // takes both, evicting A's block
    assert_eq!(bm.take_events().last(), Some(&KvEvent::Removed { hashes: prefix_hashes(&[1, 2], 2, None) }));
    assert!(bm.lookup_prefix(&[1, 2, 3], None).blocks.is_empty(), "evicted prefix no longer hits");
    bm.free(&mut b);
    ok(&bm, &[]);
}

// ---------------------------------------------------------------- prefix cache

#[test]
fn prefix_hit_after_free_revives_blocks_out_of_the_free_queue() {
    let mut bm = BlockManager::new(8, 4, true);
    let t = toks(0..13); // 3 full blocks + 1 token
    let mut a = computed_seq(&mut bm, &t, None);
    assert_eq!(a.num_hashed, 3);
    let cached = a.table[..3].to_vec();
    bm.free(&mut a);
    assert_eq!(bm.n_free(), 8, "cached blocks nobody holds are free (evictable)");
    ok(&bm, &[]);

    let hit = bm.lookup_prefix(&t, None);
    assert_eq!(hit.blocks, cached);
    assert_eq!(hit.hashes, prefix_hashes(&t, 4, None));
    assert_eq!(hit.tokens(4), 12);
    assert_eq!(bm.hit_cost(&hit), 3, "all three are in the free queue");
    let mut b = SeqBlocks::default();
    bm.take_prefix(&mut b, hit.clone());
    assert_eq!(b.table, cached);
    assert_eq!(b.num_hashed, 3);
    assert_eq!(b.last_hash, hit.hashes.last().copied());
    assert_eq!(bm.n_free(), 5, "revived out of the free queue");
    for &blk in &cached {
        assert_eq!(bm.ref_count(blk), 1);
    }
    ok(&bm, &[&b]);

    // A second taker shares them: no free block used.
    let hit2 = bm.lookup_prefix(&t, None);
    assert_eq!(bm.hit_cost(&hit2), 0);
    let mut c = SeqBlocks::default();
    bm.take_prefix(&mut c, hit2);
    assert_eq!(bm.n_free(), 5);
    for &blk in &cached {
        assert_eq!(bm.ref_count(blk), 2);
    }
    ok(&bm, &[&b, &c]);
    // Growing after the hit allocates fresh blocks for the rest.
    bm.allocate(&mut b, 13).unwrap();
    assert_eq!(b.table.len(), 4);
    assert_eq!(bm.ref_count(b.table[3]), 1);
    ok(&bm, &[&b, &c]);
    bm.free(&mut c);
    bm.free(&mut b);
    ok(&bm, &[]);
    assert_eq!(bm.stats(), PrefixStats { queried_tokens: 13 * 3, hit_tokens: 24 });
}

#[test]
fn lookup_never_covers_the_final_token() {
    let bs = 4;
    // (tokens cached (full blocks), lookup length, expected hit blocks)
    let table: &[(usize, usize, usize)] = &[
        (12, 12, 2), // exactly 3 full blocks: at most 2 hit
        (12, 13, 3),
        (12, 11, 2),
        (12, 9, 2),
        (12, 8, 1),
        (12, 5, 1),
        (12, 4, 0), // one block exactly: nothing
        (12, 1, 0),
        (4, 4, 0),
        (4, 5, 1),
    ];
    for &(cached, len, want) in table {
        let mut bm = BlockManager::new(8, bs, true);
        let all = toks(0..32);
        let mut a = computed_seq(&mut bm, &all[..cached], None);
        let hit = bm.lookup_prefix(&all[..len], None);
        assert_eq!(hit.blocks.len(), want, "cached {cached}, lookup {len}");
        assert!(hit.tokens(bs) < len, "at least one token left to compute");
        assert_eq!(bm.stats().queried_tokens, (cached + len) as u64);
        bm.free(&mut a);
        ok(&bm, &[]);
    }
    let mut bm = BlockManager::new(2, 4, true);
    assert_eq!(bm.lookup_prefix(&[], None).blocks.len(), 0);
    assert_eq!(bm.stats(), PrefixStats::default(), "an empty lookup counts nothing");
}

#[test]
fn salt_separates_tenants() {
    let t = toks(0..9);
    // (salt of the writer, salt of the reader, hit)
    let table: &[(Option<&str>, Option<&str>, bool)] = &[
        (None, None, true),
        (Some("a"), Some("a"), true),
        (Some("a"), Some("b"), false),
        (Some("a"), None, false),
        (None, Some("a"), false),
        (Some(""), None, false), // an empty salt is still a salt
        (Some("ab"), Some("a"), false),
    ];
    for &(w, r, hit) in table {
        let mut bm = BlockManager::new(8, 4, true);
        let mut a = computed_seq(&mut bm, &t, w);
        let got = bm.lookup_prefix(&t, r);
        assert_eq!(got.blocks.len(), if hit { 2 } else { 0 }, "writer {w:?} reader {r:?}");
        let mut b = SeqBlocks::default();
        bm.take_prefix(&mut b, got);
        bm.allocate(&mut b, t.len()).unwrap();
        bm.commit(&mut b, &t, t.len(), r);
        if !hit {
            assert_ne!(b.table[..2], a.table[..2], "no block shared across tenants");
        }
        ok(&bm, &[&a, &b]);
        bm.free(&mut a);
        bm.free(&mut b);
        ok(&bm, &[]);
    }
    assert_ne!(prefix_hashes(&t, 4, Some("a")), prefix_hashes(&t, 4, Some("b")));
}

#[test]
fn prefix_caching_off_never_hits_and_never_stores() {
    let mut bm = BlockManager::new(8, 4, false);
    let t = toks(0..9);
    let mut a = computed_seq(&mut bm, &t, None);
    assert_eq!(a.num_hashed, 0);
    assert!(bm.take_events().is_empty());
    bm.free(&mut a);
    assert!(bm.lookup_prefix(&t, None).blocks.is_empty());
    assert_eq!(bm.stats(), PrefixStats::default());
    ok(&bm, &[]);
}

// ---------------------------------------------------------------- KV events

#[test]
fn commit_emits_stored_with_parent_chaining() {
    for salt in [None, Some("t")] {
        let mut bm = BlockManager::new(8, 4, true);
        let t = toks(0..14); // 3 full blocks + 2
        let h = prefix_hashes(&t, 4, salt);
        assert_eq!(h.len(), 3);
        let mut s = SeqBlocks::default();
        bm.allocate(&mut s, 6).unwrap();
        bm.commit(&mut s, &t, 3, salt); // no full block yet
        assert!(bm.take_events().is_empty());
        bm.commit(&mut s, &t, 6, salt); // first block full
        assert_eq!(bm.take_events(), vec![KvEvent::Stored { parent: None, hashes: vec![h[0]] }]);
        assert_eq!((s.num_hashed, s.last_hash), (1, Some(h[0])));
        bm.commit(&mut s, &t, 6, salt); // again: nothing new
        assert!(bm.take_events().is_empty());
        bm.allocate(&mut s, 14).unwrap();
        bm.commit(&mut s, &t, 14, salt); // blocks 1 and 2 in one event, chained to block 0
        assert_eq!(bm.take_events(), vec![KvEvent::Stored { parent: Some(h[0]), hashes: vec![h[1], h[2]] }]);
        assert_eq!((s.num_hashed, s.last_hash), (3, Some(h[2])));
        ok(&bm, &[&s]);

        // Commit caps at the blocks the sequence holds.
        let mut short = SeqBlocks::default();
        let t2 = toks(50..60);
        bm.allocate(&mut short, 4).unwrap();
        bm.commit(&mut short, &t2, 8, salt);
        assert_eq!(short.num_hashed, 1);
        bm.take_events();

        // Eviction: Removed, tail first.
        bm.free(&mut s);
        bm.free(&mut short);
        let mut big = SeqBlocks::default();
        bm.allocate(&mut big, 32).unwrap();
        let removed: Vec<SeqHash> = bm
            .take_events()
            .into_iter()
            .flat_map(|e| match e {
                KvEvent::Removed { hashes } => hashes,
                e => panic!("unexpected {e:?}"),
            })
            .collect();
        let h2 = prefix_hashes(&t2, 4, salt);
        assert_eq!(removed, vec![h[2], h[1], h[0], h2[0]], "released order, tail first");
        ok(&bm, &[&big]);
    }
}

#[test]
fn stored_after_a_duplicate_block_names_the_right_parent() {
    // B computed the same first two blocks as A at the same time (its copies
    // stay private), then a third of its own: its Stored event must chain to
    // the hash of block 1, not claim to be a root.
    let mut bm = BlockManager::new(8, 2, true);
    let ta = toks(0..5);
    let mut tb = toks(0..4);
    tb.extend([9, 9, 9]);
    let mut a = private_seq(&mut bm, &ta);
    let mut b = private_seq(&mut bm, &tb);
    bm.commit(&mut a, &ta, 5, None);
    let ha = prefix_hashes(&ta, 2, None);
    assert_eq!(bm.take_events(), vec![KvEvent::Stored { parent: None, hashes: ha.clone() }]);
    bm.commit(&mut b, &tb, 7, None);
    let hb = prefix_hashes(&tb, 2, None);
    assert_eq!(hb[..2], ha[..]);
    assert_eq!(bm.take_events(), vec![KvEvent::Stored { parent: Some(hb[1]), hashes: vec![hb[2]] }]);
    assert_eq!((b.num_hashed, b.last_hash), (3, Some(hb[2])));
    // The index now serves the mixed chain: A's two blocks then B's third.
    let mut probe = tb.clone();
    probe.push(1);
    assert_eq!(bm.lookup_prefix(&probe, None).blocks, vec![a.table[0], a.table[1], b.table[2]]);
    ok(&bm, &[&a, &b]);
    bm.free(&mut a);
    bm.free(&mut b);
    ok(&bm, &[]);
}

// ---------------------------------------------------------------- fork, copy-on-write

#[test]
fn copy_on_write_only_for_shared_blocks() {
    let mut bm = BlockManager::new(6, 4, true);
    let t = toks(0..6); // block 0 full, block 1 half
    let mut a = computed_seq(&mut bm, &t, None);
    ok(&bm, &[&a]);
    // Unshared: no copy, wherever the write.
    for pos in [0, 3, 4, 6, 7] {
        assert_eq!(bm.prepare_write(&mut a, pos).unwrap(), None, "pos {pos}");
    }
    assert_eq!(bm.prepare_write(&mut a, 8).unwrap(), None, "past the table: nothing to copy");
    let mut b = bm.fork(&a);
    assert_eq!(b, a);
    for &blk in &a.table {
        assert_eq!(bm.ref_count(blk), 2);
    }
    ok(&bm, &[&a, &b]);
    let free = bm.n_free();

    // B writes position 6 (block 1, shared): it gets a private copy.
    let (from, to) = bm.prepare_write(&mut b, 6).unwrap().expect("shared block copied");
    assert_eq!(from, a.table[1]);
    assert_eq!(b.table[1], to);
    assert_eq!(a.table[1], from, "the other holder keeps the original");
    assert_eq!(b.table[0], a.table[0], "untouched blocks stay shared");
    assert_eq!((bm.ref_count(from), bm.ref_count(to), bm.ref_count(a.table[0])), (1, 1, 2));
    assert_eq!(bm.n_free(), free - 1);
    ok(&bm, &[&a, &b]);
    // Now nobody shares block 1: no more copies for either.
    assert_eq!(bm.prepare_write(&mut b, 7).unwrap(), None);
    assert_eq!(bm.prepare_write(&mut a, 6).unwrap(), None);
    ok(&bm, &[&a, &b]);

    // Three holders: each write of a shared block copies until one is left.
    let mut c = bm.fork(&a);
    let mut d = bm.fork(&a);
    assert_eq!(bm.ref_count(a.table[1]), 3);
    assert!(bm.prepare_write(&mut c, 5).unwrap().is_some());
    assert!(bm.prepare_write(&mut d, 5).unwrap().is_some());
    assert_eq!(bm.prepare_write(&mut a, 5).unwrap(), None);
    assert_eq!(bm.ref_count(a.table[0]), 4);
    ok(&bm, &[&a, &b, &c, &d]);

    // Out of blocks: the copy fails and changes nothing.
    let mut e = bm.fork(&a);
    let mut filler = SeqBlocks::default();
    bm.allocate(&mut filler, bm.n_free() * 4).unwrap();
    assert_eq!(bm.n_free(), 0);
    let before = e.clone();
    assert!(matches!(bm.prepare_write(&mut e, 6), Err(EngineError::OutOfBlocks(_))));
    assert_eq!(e, before);
    ok(&bm, &[&a, &b, &c, &d, &e, &filler]);
    for s in [&mut a, &mut b, &mut c, &mut d, &mut e, &mut filler] {
        bm.free(s);
    }
    assert_eq!(bm.n_free(), 6);
    ok(&bm, &[]);
}

#[test]
fn copy_of_a_cached_block_is_private_and_keeps_the_chain() {
    // A private copy of a cached block in the middle of the prefix must not be
    // registered under a hash that names a different prefix.
    let mut bm = BlockManager::new(10, 2, true);
    let t = toks(0..7); // 3 full blocks + 1
    let h = prefix_hashes(&t, 2, None);
    let mut a = computed_seq(&mut bm, &t, None);
    bm.take_events();
    let mut b = bm.fork(&a);
    let (from, to) = bm.prepare_write(&mut b, 2).unwrap().expect("block 1 is shared");
    assert_eq!((from, b.table[1]), (a.table[1], to));
    assert!(b.num_hashed <= 1, "the copy is not a registered block");
    ok(&bm, &[&a, &b]);
    bm.commit(&mut b, &t, 7, None);
    // Block 1's tokens as a *first* block must not hit the copy (its KV is for positions 2..4).
    let probe = [t[2], t[3], 0];
    assert!(bm.lookup_prefix(&probe, None).blocks.is_empty(), "a mid-prefix block served as a root block");
    // Every block of the prefix is already cached: nothing new to store.
    let events = bm.take_events();
    assert!(events.iter().all(|e| !matches!(e, KvEvent::Stored { .. })), "{events:?}");
    assert_eq!(b.last_hash, Some(h[2]));
    assert_eq!(bm.lookup_prefix(&t, None).blocks, a.table[..3].to_vec());
    ok(&bm, &[&a, &b]);
    bm.free(&mut a);
    bm.free(&mut b);
    ok(&bm, &[]);
}

// ---------------------------------------------------------------- duplicates

#[test]
fn duplicate_concurrent_computation_leaves_the_second_copy_private() {
    let mut bm = BlockManager::new(8, 2, true);
    let t = toks(0..5);
    let h = prefix_hashes(&t, 2, None);
    // Both admitted before either committed: neither found a hit.
    let mut a = private_seq(&mut bm, &t);
    let mut b = private_seq(&mut bm, &t);
    assert!(a.table.iter().all(|x| !b.table.contains(x)));
    bm.commit(&mut a, &t, 5, None);
    assert_eq!(bm.take_events(), vec![KvEvent::Stored { parent: None, hashes: h.clone() }]);
    bm.commit(&mut b, &t, 5, None);
    assert!(bm.take_events().is_empty(), "the second copy is not stored");
    assert_eq!((b.num_hashed, b.last_hash), (2, Some(h[1])));
    ok(&bm, &[&a, &b]);
    // Lookups find A's blocks.
    assert_eq!(bm.lookup_prefix(&t, None).blocks, a.table[..2].to_vec());
    // B's copies are uncached: freed to the front, reused before A's cached blocks.
    let a_cached = a.table[..2].to_vec();
    bm.free(&mut b);
    bm.free(&mut a);
    ok(&bm, &[]);
    let mut c = SeqBlocks::default();
    bm.allocate(&mut c, 2 * 6).unwrap(); // every uncached block: B's three and A's partial tail
    assert!(c.table.iter().all(|x| !a_cached.contains(x)), "{:?} vs cached {a_cached:?}", c.table);
    assert!(bm.take_events().is_empty(), "A's cached blocks survive");
    assert_eq!(bm.lookup_prefix(&t, None).blocks, a_cached);
    ok(&bm, &[&c]);
}

#[test]
fn free_is_tail_first_and_resets_the_sequence() {
    let mut bm = BlockManager::new(4, 2, true);
    let mut s = private_seq(&mut bm, &toks(0..8));
    let table = s.table.clone();
    bm.free(&mut s);
    assert_eq!(s, SeqBlocks::default());
    // Uncached blocks pushed to the front tail first: the root is reused first.
    let mut t = SeqBlocks::default();
    bm.allocate(&mut t, 2).unwrap();
    assert_eq!(t.table, vec![table[0]]);
    ok(&bm, &[&t]);
}

#[test]
#[should_panic(expected = "double free")]
fn double_free_panics() {
    let mut bm = BlockManager::new(2, 2, true);
    let mut s = private_seq(&mut bm, &[1, 2]);
    let mut copy = s.clone();
    bm.free(&mut s);
    bm.free(&mut copy);
}

#[test]
fn check_detects_a_wrong_holder_set() {
    let mut bm = BlockManager::new(4, 2, true);
    let a = private_seq(&mut bm, &[1, 2, 3]);
    assert!(bm.check(&[&a]).is_ok());
    assert!(bm.check(&[]).is_err(), "held blocks with no holder");
    assert!(bm.check(&[&a, &a]).is_err(), "two holders, one reference");
    let f = bm.fork(&a);
    assert!(bm.check(&[&a, &f]).is_ok());
    assert!(bm.check(&[&a]).is_err());
}

#[test]
fn cached_prefix_tokens_is_a_lookup_that_counts_nothing() {
    let mut bm = BlockManager::new(8, 2, true);
    let ta = toks(0..6); // 3 full blocks
    let mut a = computed_seq(&mut bm, &ta, Some("s"));
    bm.free(&mut a);
    let before = bm.stats();
    // (prompt, salt, tokens a lookup would hit)
    let mut longer = ta.clone();
    longer.extend([7, 8, 9]);
    let mut other = ta.clone();
    other[3] = 99;
    let cases: Vec<(Vec<u32>, Option<&str>, usize)> = vec![
        (longer.clone(), Some("s"), 6),
        // The last token is always computed: a prompt equal to the cached tokens hits all but its last block.
        (ta.clone(), Some("s"), 4),
        (other, Some("s"), 2),
        (longer.clone(), None, 0),
        (longer.clone(), Some("t"), 0),
        (vec![], Some("s"), 0),
    ];
    for (prompt, salt, want) in cases {
        assert_eq!(bm.cached_prefix_tokens(&prompt, salt), want, "{prompt:?} {salt:?}");
        assert_eq!(bm.cached_prefix_tokens(&prompt, salt), bm.clone().lookup_prefix(&prompt, salt).tokens(2));
    }
    assert_eq!(bm.stats(), before, "no lookup counted");
}
