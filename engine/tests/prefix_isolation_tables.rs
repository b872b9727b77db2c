//! The prefix cache keeps tenants apart even where its 64-bit hashes collide. The test hook
//! `BlockManager::with_hash_bits` makes collisions as easy to forge as a test wants: every
//! hash equal (as if two tenants' roots were equal), or a chosen block's hash equal to
//! another tenant's or another token's. A hit still needs the block's key (its salt and
//! its whole prefix) and its token ids, on the local admission path and on the decode
//! side's `Reserve` path alike. `check()` runs after every step.

mod block_manager_support;
mod scheduler_support;

use block_manager_support::{computed_seq, ok, toks};
use scheduler_support::{cfg, prompt, req, run_to_end};
use tandem_engine::block_manager::{prefix_hashes, BlockManager, KvEvent, SeqBlocks, SeqHash};
use tandem_engine::scheduler::{RequestId, Scheduler};
use tandem_engine::FinishReason;

/// The hashes a manager under `with_hash_bits(bits)` names the blocks of `tokens` by.
fn short_hashes(tokens: &[u32], bs: usize, salt: Option<&str>, bits: u32) -> Vec<SeqHash> {
    let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    prefix_hashes(tokens, bs, salt).into_iter().map(|h| SeqHash(h.0 & mask)).collect()
}

fn stored(events: &[KvEvent]) -> Vec<SeqHash> {
    events
        .iter()
        .flat_map(|e| match e {
            KvEvent::Stored { hashes, .. } => hashes.clone(),
            KvEvent::Removed { .. } => Vec::new(),
        })
        .collect()
}

#[test]
fn a_hit_needs_the_same_salt_even_when_every_hash_collides() {
    // 2 full blocks a lookup may cover.
    let t = toks(0..9);
    // (hash bits, salt of the writer, salt of the reader, blocks the reader hits)
    let table: &[(u32, Option<&str>, Option<&str>, usize)] = &[
        (64, Some("a"), Some("a"), 2),
        (64, Some("a"), Some("b"), 0),
        (64, None, None, 2),
        // Every hash 0: only the writer's first block is cached (its second block's hash
        // is taken), and only the writer's salt finds it.
        (0, Some("a"), Some("a"), 1),
        (0, None, None, 1),
        (0, Some("a"), Some("b"), 0),
        (0, Some("a"), None, 0),
        (0, None, Some("a"), 0),
        (0, Some(""), None, 0),
        (0, Some("tenant-1"), Some("tenant-2"), 0),
    ];
    for &(bits, w, r, want) in table {
        let mut bm = BlockManager::new(8, 4, true).with_hash_bits(bits);
        let mut a = computed_seq(&mut bm, &t, w);
        assert_eq!(stored(&bm.take_events()).len(), if bits == 0 { 1 } else { 2 });
        let hit = bm.lookup_prefix(&t, r);
        assert_eq!(hit.blocks.len(), want, "bits {bits} writer {w:?} reader {r:?}");
        assert_eq!(hit.blocks[..], a.table[..want], "a hit is the writer's blocks");
        let mut b = SeqBlocks::default();
        bm.take_prefix(&mut b, hit);
        bm.allocate(&mut b, t.len()).unwrap();
        bm.commit(&mut b, &t, t.len(), r);
        if w != r {
            assert!(b.table.iter().all(|x| !a.table.contains(x)), "no block shared across salts");
        }
        if bits == 0 {
            assert!(stored(&bm.take_events()).is_empty(), "the reader's blocks stay private: their hash is taken");
        }
        ok(&bm, &[&a, &b]);
        bm.free(&mut a);
        bm.free(&mut b);
        ok(&bm, &[]);
    }
}

#[test]
fn a_chain_forged_to_collide_at_every_block_with_another_salt_is_a_miss() {
    let (bits, bs) = (8, 4);
    let t = toks(100..109);
    let want = short_hashes(&t, bs, Some("victim"), bits);
    let forged = (0..1_000_000)
        .map(|i| format!("forger-{i}"))
        .find(|s| short_hashes(&t, bs, Some(s), bits) == want)
        .expect("a salt whose hashes all collide with the victim's");
    assert_ne!(prefix_hashes(&t, bs, Some(&forged)), prefix_hashes(&t, bs, Some("victim")), "only the short hashes");

    let mut bm = BlockManager::new(8, bs, true).with_hash_bits(bits);
    let mut a = computed_seq(&mut bm, &t, Some("victim"));
    assert_eq!(bm.take_events(), vec![KvEvent::Stored { parent: None, hashes: want.clone() }]);
    assert!(bm.lookup_prefix(&t, Some(&forged)).blocks.is_empty(), "same tokens, same hashes, another salt");
    let mut b = computed_seq(&mut bm, &t, Some(&forged));
    assert!(b.table.iter().all(|x| !a.table.contains(x)));
    assert!(bm.take_events().is_empty(), "the forger's blocks stay private: their hashes are taken");
    assert!(bm.lookup_prefix(&t, Some(&forged)).blocks.is_empty(), "and it never hits them later");
    assert_eq!(bm.lookup_prefix(&t, Some("victim")).blocks, a.table[..2], "the victim still hits");
    ok(&bm, &[&a, &b]);
    bm.free(&mut a);
    bm.free(&mut b);
    ok(&bm, &[]);
}

#[test]
fn a_collision_past_the_first_block_does_not_cross_into_another_salts_chain() {
    // Block size 1: the victim caches [p, q]; the forger's own first block r is cached
    // under its own salt, and its second block q collides with the victim's second.
    let (bits, bs, p, q) = (8, 1, 7u32, 8u32);
    let victim = short_hashes(&[p, q, 0], bs, Some("victim"), bits);
    let r = (1000..1_000_000u32)
        .find(|&r| {
            let h = short_hashes(&[r, q], bs, Some("forger"), bits);
            h[1] == victim[1] && !victim.contains(&h[0])
        })
        .expect("a first block that makes the second collide");

    let mut bm = BlockManager::new(8, bs, true).with_hash_bits(bits);
    let mut a = computed_seq(&mut bm, &[p, q, 0], Some("victim"));
    let mut b = computed_seq(&mut bm, &[r, 0], Some("forger"));
    let hit = bm.lookup_prefix(&[r, q, 0], Some("forger"));
    assert_eq!(hit.blocks, b.table[..1], "its own first block, not the victim's second");
    // The other way round: the victim's chain does not run into the forger's blocks.
    let mut c = computed_seq(&mut bm, &[r, q, 0], Some("forger"));
    assert_eq!(bm.lookup_prefix(&[p, q, 0], Some("victim")).blocks, a.table[..2]);
    assert!(c.table.iter().all(|x| !a.table.contains(x)));
    ok(&bm, &[&a, &b, &c]);
    for s in [&mut a, &mut b, &mut c] {
        bm.free(s);
    }
    ok(&bm, &[]);
}

#[test]
fn a_collision_between_token_ids_under_one_salt_is_a_miss() {
    let (bits, bs, salt) = (8, 1, Some("tenant"));
    let t1 = 7u32;
    let h1 = short_hashes(&[t1], bs, salt, bits);
    let t2 = (t1 + 1..1_000_000).find(|&t| short_hashes(&[t], bs, salt, bits) == h1).expect("a colliding token");

    let mut bm = BlockManager::new(4, bs, true).with_hash_bits(bits);
    let mut a = computed_seq(&mut bm, &[t1, 1], salt);
    assert_eq!(
        bm.take_events(),
        vec![KvEvent::Stored { parent: None, hashes: short_hashes(&[t1, 1], bs, salt, bits) }]
    );
    assert!(bm.lookup_prefix(&[t2, 1], salt).blocks.is_empty(), "same hash, other token: a miss");
    assert_eq!(bm.lookup_prefix(&[t1, 1], salt).blocks, a.table[..1], "the genuine prefix still hits");
    let mut b = computed_seq(&mut bm, &[t2, 1], salt);
    assert!(!b.table.contains(&a.table[0]));
    assert!(!stored(&bm.take_events()).contains(&h1[0]), "the colliding block stays private");
    ok(&bm, &[&a, &b]);
    bm.free(&mut a);
    bm.free(&mut b);
    ok(&bm, &[]);
}

#[test]
fn the_reserve_path_counts_cached_blocks_of_the_same_salt_only() {
    // 3 full blocks a reservation may find cached.
    let p = prompt(13, 3);
    // (hash bits, salt of the second request, cached blocks it is told of)
    let table: &[(u32, Option<&str>, usize)] = &[
        (64, Some("alice"), 3),
        (64, Some("bob"), 0),
        (64, None, 0),
        (0, Some("alice"), 1), // every hash 0: one cached block, still alice's alone
        (0, Some("bob"), 0),
        (0, None, 0),
    ];
    for &(bits, salt, want) in table {
        let mut s = Scheduler::new(cfg(64, 8), BlockManager::new(16, 4, true).with_hash_bits(bits));
        let mut first = req(1, p.clone(), 2);
        first.cache_salt = Some("alice".into());
        let (_, cached) = s.add_remote(first).unwrap();
        assert_eq!(cached, 0);
        s.remote_kv_ready(RequestId(1), 42).unwrap();
        run_to_end(&mut s, 5, 20);
        let mut second = req(2, p.clone(), 2);
        second.cache_salt = salt.map(String::from);
        let (_, cached) = s.add_remote(second).unwrap();
        assert_eq!(cached, want, "bits {bits}, salt {salt:?}");
        s.finish(RequestId(2), FinishReason::Abort);
        s.blocks.check(&s.holders()).unwrap();
        assert_eq!(s.blocks.n_free(), 16);
    }
}

#[test]
fn hashes_are_chained_salted_and_the_same_on_every_worker() {
    let t = toks(0..12);
    let salts = [None, Some(""), Some("a"), Some("b"), Some("ab"), Some("a\0")];
    let firsts: std::collections::HashSet<SeqHash> = salts.iter().map(|&s| prefix_hashes(&t, 4, s)[0]).collect();
    assert_eq!(firsts.len(), salts.len(), "every salt starts its own chain");
    // One token changed in block 1: blocks 0 keep their hash, 1 and 2 change.
    let mut u = t.clone();
    u[5] = 99;
    let (ht, hu) = (prefix_hashes(&t, 4, Some("a")), prefix_hashes(&u, 4, Some("a")));
    assert_eq!(ht[0], hu[0]);
    assert!(ht[1] != hu[1] && ht[2] != hu[2]);
    // Two managers (a prefill and a decode worker) name the same blocks alike.
    for salt in salts {
        let (mut x, mut y) = (BlockManager::new(8, 4, true), BlockManager::new(16, 4, true));
        let mut sx = computed_seq(&mut x, &t, salt);
        let mut sy = computed_seq(&mut y, &t, salt);
        let ex = x.take_events();
        assert_eq!(ex, y.take_events());
        assert_eq!(stored(&ex), prefix_hashes(&t, 4, salt));
        x.free(&mut sx);
        y.free(&mut sy);
    }
}
