//! Table tests of the prefix index: each case is a worker's stream of events and the
//! lookups expected after it.

use std::time::{Duration, Instant};

use super::*;
use pb::kv_event::Event;

fn w(id: &str) -> WorkerId {
    WorkerId::new(id).unwrap()
}

fn snap(hashes: &[u64], last: bool) -> Event {
    Event::Snapshot(pb::KvSnapshot { block_hashes: hashes.to_vec(), last })
}
fn stored(hashes: &[u64]) -> Event {
    Event::Stored(pb::KvStored { parent_hash: None, block_hashes: hashes.to_vec() })
}
fn removed(hashes: &[u64]) -> Event {
    Event::Removed(pb::KvRemoved { block_hashes: hashes.to_vec() })
}
fn cleared() -> Event {
    Event::Cleared(pb::KvCleared {})
}

/// Feeds `events` to worker `a` with consecutive ids from 1; the result of each.
fn feed(index: &mut PrefixIndex, worker: &WorkerId, events: Vec<Event>) -> Vec<Result<(), Resync>> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| index.apply(worker, &pb::KvEvent { event_id: i as u64 + 1, event: Some(e) }))
        .collect()
}

#[test]
fn events_build_what_each_worker_holds() {
    let prompt = [1, 2, 3, 4];
    // (events, leading blocks of `prompt` held after them)
    let cases: Vec<(Vec<Event>, usize)> = vec![
        (vec![snap(&[], true)], 0),
        (vec![snap(&[1, 2], true)], 2),
        // A snapshot in parts counts every part.
        (vec![snap(&[1], false), snap(&[2, 3], true)], 3),
        (vec![snap(&[], true), stored(&[1, 2, 3, 4])], 4),
        // Leading blocks only: a hole stops the count, whatever follows it.
        (vec![snap(&[], true), stored(&[1, 3, 4])], 1),
        (vec![snap(&[], true), stored(&[2, 3])], 0),
        (vec![snap(&[1, 2, 3], true), removed(&[2])], 1),
        (vec![snap(&[1, 2, 3], true), removed(&[9])], 3),
        (vec![snap(&[1, 2, 3], true), cleared()], 0),
        (vec![snap(&[1, 2, 3], true), cleared(), stored(&[1])], 1),
    ];
    let now = Instant::now();
    for (events, want) in cases {
        let mut index = PrefixIndex::new();
        let a = w("a");
        let desc = format!("{events:?}");
        assert!(feed(&mut index, &a, events).iter().all(Result::is_ok), "{desc}");
        assert_eq!(index.overlap(&a, &prompt, now), want, "{desc}");
        assert_eq!(index.lookup(&prompt, now), vec![(a.clone(), want)], "{desc}");
        assert!(index.synced(&a), "{desc}");
    }
}

#[test]
fn out_of_order_streams_drop_the_worker_and_ask_for_a_resync() {
    let now = Instant::now();
    // (events with their ids, the first failure expected)
    let cases: Vec<(Vec<(u64, Event)>, Resync)> = vec![
        // A gap: event 3 never came.
        (vec![(1, snap(&[1, 2], true)), (2, stored(&[3])), (4, stored(&[4]))], Resync::Gap { expected: 3, got: 4 }),
        // A repeat.
        (vec![(1, snap(&[1, 2], true)), (1, stored(&[3]))], Resync::Gap { expected: 2, got: 1 }),
        // A stream that does not open with a snapshot (an old worker's `Cleared`).
        (vec![(1, cleared())], Resync::Order),
        (vec![(1, stored(&[1]))], Resync::Order),
        // Live events before the snapshot's last part.
        (vec![(1, snap(&[1], false)), (2, stored(&[2]))], Resync::Order),
        // A second snapshot on a live stream.
        (vec![(1, snap(&[1], true)), (2, snap(&[2], true))], Resync::Order),
    ];
    for (events, want) in cases {
        let desc = format!("{events:?}");
        let mut index = PrefixIndex::new();
        let a = w("a");
        let err = events
            .into_iter()
            .map(|(id, e)| index.apply(&a, &pb::KvEvent { event_id: id, event: Some(e) }))
            .find_map(Result::err);
        assert_eq!(err, Some(want), "{desc}");
        assert_eq!(index.overlap(&a, &[1, 2, 3], now), 0, "dropped after a failure: {desc}");
        assert!(!index.synced(&a), "{desc}");
        // A fresh stream starts over from its snapshot.
        index.restart(&a);
        assert!(feed(&mut index, &a, vec![snap(&[1], true), stored(&[2])]).iter().all(Result::is_ok), "{desc}");
        assert_eq!(index.overlap(&a, &[1, 2, 3], now), 2, "{desc}");
    }
}

#[test]
fn workers_are_kept_apart_and_leave_alone() {
    let now = Instant::now();
    let (a, b, c) = (w("a"), w("b"), w("c"));
    let mut index = PrefixIndex::new();
    feed(&mut index, &a, vec![snap(&[1, 2, 3], true)]);
    feed(&mut index, &b, vec![snap(&[1], true), stored(&[2, 3, 4])]);
    feed(&mut index, &c, vec![snap(&[7, 8], true)]);
    let prompt = [1, 2, 3, 4, 5];
    assert_eq!(index.lookup(&prompt, now), vec![(a.clone(), 3), (b.clone(), 4), (c.clone(), 0)]);
    assert_eq!((index.blocks(&a), index.blocks(&b), index.blocks(&c)), (3, 4, 2));
    let mut sizes = index.sizes();
    sizes.sort();
    assert_eq!(sizes, vec![(a.clone(), 3), (b.clone(), 4), (c.clone(), 2)]);
    // b's blocks leave with it; a's are untouched.
    index.leave(&b);
    assert_eq!(index.lookup(&prompt, now), vec![(a.clone(), 3), (c.clone(), 0)]);
    assert_eq!(index.overlap(&b, &prompt, now), 0);
    // A restart (its stream broke) forgets what a held until its new snapshot.
    index.restart(&a);
    assert_eq!(index.overlap(&a, &prompt, now), 0);
    assert!(!index.synced(&a));
    // An unknown worker holds nothing.
    assert_eq!(index.overlap(&w("z"), &prompt, now), 0);
}

#[test]
fn pending_blocks_count_until_their_deadline_or_their_event() {
    let t0 = Instant::now();
    let ttl = Duration::from_secs(2);
    let (a, b) = (w("a"), w("b"));
    let mut index = PrefixIndex::new();
    feed(&mut index, &a, vec![snap(&[1], true)]);
    index.add_pending(&a, &[1, 2, 3], t0, t0 + ttl);
    assert_eq!(index.overlap(&a, &[1, 2, 3, 4], t0), 3, "held 1, pending 2 and 3");
    assert_eq!(index.overlap(&b, &[1, 2, 3, 4], t0), 0, "pending on a only");
    assert_eq!(index.blocks(&a), 1, "pending blocks are not held blocks");
    assert_eq!(index.overlap(&a, &[1, 2, 3, 4], t0 + ttl), 1, "expired");
    // The event confirms a pending block: it stays after the deadline.
    feed_from(&mut index, &a, 2, vec![stored(&[2])]);
    assert_eq!(index.overlap(&a, &[1, 2, 3], t0 + ttl), 2);
    // A pending block survives a restart (the router did send it), not its deadline.
    index.add_pending(&a, &[7, 8], t0, t0 + ttl);
    index.restart(&a);
    assert_eq!(index.overlap(&a, &[7, 8, 9], t0), 2);
    assert_eq!(index.overlap(&a, &[7, 8, 9], t0 + ttl), 0);
    assert_eq!(index.overlap(&a, &[1, 2, 3], t0), 0, "held blocks went with the restart");
    // A worker first seen through a pending entry still expects its snapshot first.
    index.add_pending(&b, &[5], t0, t0 + ttl);
    assert_eq!(index.apply(&b, &pb::KvEvent { event_id: 1, event: Some(stored(&[6])) }), Err(Resync::Order));
}

#[test]
fn pending_entries_are_bounded() {
    let t0 = Instant::now();
    let a = w("a");
    let len = |index: &PrefixIndex| index.workers.get(&a).unwrap().pending.len();
    let mut index = PrefixIndex::new();
    // A flood larger than the cap keeps at most the cap.
    let flood: Vec<u64> = (0..MAX_PENDING as u64 + 10).collect();
    index.add_pending(&a, &flood, t0, t0 + Duration::from_secs(1));
    assert_eq!(len(&index), MAX_PENDING);
    // Full of live entries: the next prompt starts pending over rather than grow it.
    index.add_pending(&a, &[u64::MAX - 1, u64::MAX - 2], t0, t0 + Duration::from_secs(1));
    assert_eq!(len(&index), 2);
    // Full of expired entries: they make room.
    index.add_pending(&a, &flood[..MAX_PENDING - 2], t0, t0 + Duration::from_secs(1));
    assert_eq!(len(&index), MAX_PENDING);
    let later = t0 + Duration::from_secs(5);
    index.add_pending(&a, &[u64::MAX], later, later + Duration::from_secs(1));
    assert_eq!(len(&index), 1);
    assert_eq!(index.overlap(&a, &[u64::MAX], later), 1);
}

fn feed_from(index: &mut PrefixIndex, worker: &WorkerId, first_id: u64, events: Vec<Event>) {
    for (i, e) in events.into_iter().enumerate() {
        index.apply(worker, &pb::KvEvent { event_id: first_id + i as u64, event: Some(e) }).unwrap();
    }
}
