//! The global prefix index: which worker holds which prefix-cache blocks.
//!
//! Fed by each worker's `KvEvents` stream (a snapshot, then live changes with consecutive
//! ids) and read by placement: for a prompt's chained block hashes, how many leading blocks
//! each worker holds. A block hash names its whole prefix (it chains from the salt through
//! every token before it), so a worker that holds block `i` of a prompt holds that prompt's
//! prefix up to `i`; a lookup walks a worker's blocks from the first and stops at its first
//! miss.
//!
//! Blocks the router has just sent a worker but that no event has confirmed yet are
//! *pending* on it until a deadline: requests that share a new prefix and arrive together
//! (an agent's fan-out, `n > 1`) then follow the first one instead of spreading out.
//!
//! A pure data structure: no I/O, no clock of its own (callers pass `now`). It trusts
//! nothing about a stream's order: an event out of sequence is reported, and the caller
//! drops the worker's entries and subscribes again.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use tandem_cluster::WorkerId;
use tandem_proto::tandem::worker::v1 as pb;

/// Most pending hashes kept per worker: a flood of routed prompts cannot grow the index
/// without bound (expired ones are dropped first; past the cap the oldest go).
pub const MAX_PENDING: usize = 65_536;

/// Why a worker's stream must start over from a fresh snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resync {
    /// An event's id is not the one expected next.
    Gap { expected: u64, got: u64 },
    /// The stream did not open with a snapshot, or a snapshot came after live events.
    Order,
}

impl Resync {
    /// A label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Resync::Gap { .. } => "gap",
            Resync::Order => "order",
        }
    }
}

/// What the index knows of one worker.
#[derive(Debug, Default)]
struct Held {
    /// Blocks its events say it holds.
    blocks: HashSet<u64>,
    /// Blocks routed to it and not yet confirmed, with when they stop counting.
    pending: HashMap<u64, Instant>,
    /// The id the next event must carry (1: a fresh stream).
    next_event: u64,
    /// The opening snapshot has been read whole: `blocks` is what the worker holds.
    synced: bool,
}

/// Which blocks each worker holds.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    workers: HashMap<WorkerId, Held>,
}

impl PrefixIndex {
    pub fn new() -> PrefixIndex {
        PrefixIndex::default()
    }

    /// Forgets what it knew of `worker` and expects a new stream (event 1, a snapshot).
    /// Called when a stream opens, breaks or shows a gap. Pending blocks stay: they record
    /// what this router sent, which a new stream does not undo.
    pub fn restart(&mut self, worker: &WorkerId) {
        let h = self.workers.entry(worker.clone()).or_default();
        h.blocks.clear();
        h.next_event = 1;
        h.synced = false;
    }

    /// Forgets `worker` altogether: it left the cluster.
    pub fn leave(&mut self, worker: &WorkerId) {
        self.workers.remove(worker);
    }

    /// Applies one event of `worker`'s stream. On `Err` the worker's blocks are already
    /// dropped; the caller subscribes again.
    pub fn apply(&mut self, worker: &WorkerId, event: &pb::KvEvent) -> Result<(), Resync> {
        let h = self.workers.entry(worker.clone()).or_insert_with(|| Held { next_event: 1, ..Held::default() });
        let result = Self::apply_to(h, event);
        if result.is_err() {
            h.blocks.clear();
            h.synced = false;
        }
        result
    }

    fn apply_to(h: &mut Held, event: &pb::KvEvent) -> Result<(), Resync> {
        if event.event_id != h.next_event {
            return Err(Resync::Gap { expected: h.next_event, got: event.event_id });
        }
        h.next_event += 1;
        use pb::kv_event::Event;
        match &event.event {
            Some(Event::Snapshot(s)) if !h.synced => {
                h.blocks.extend(&s.block_hashes);
                h.synced = s.last;
            }
            Some(Event::Snapshot(_)) => return Err(Resync::Order),
            _ if !h.synced => return Err(Resync::Order),
            Some(Event::Stored(s)) => {
                for x in &s.block_hashes {
                    h.pending.remove(x);
                    h.blocks.insert(*x);
                }
            }
            Some(Event::Removed(r)) => {
                for x in &r.block_hashes {
                    h.blocks.remove(x);
                }
            }
            Some(Event::Cleared(_)) => h.blocks.clear(),
            None => {}
        }
        Ok(())
    }

    /// Marks `hashes` as pending on `worker` until `until`: routed there, not yet reported.
    pub fn add_pending(&mut self, worker: &WorkerId, hashes: &[u64], now: Instant, until: Instant) {
        let h = self.workers.entry(worker.clone()).or_insert_with(|| Held { next_event: 1, ..Held::default() });
        if h.pending.len() + hashes.len() > MAX_PENDING {
            h.pending.retain(|_, t| *t > now);
        }
        if h.pending.len() + hashes.len() > MAX_PENDING {
            // Still full of live entries: a flood. Pending is a hint; start it over.
            h.pending.clear();
        }
        for x in hashes.iter().take(MAX_PENDING) {
            if !h.blocks.contains(x) {
                h.pending.insert(*x, until);
            }
        }
    }

    /// How many leading blocks of `hashes` (a prompt's chained hashes, in order) `worker`
    /// holds or has pending at `now`; 0 for a worker the index does not know.
    pub fn overlap(&self, worker: &WorkerId, hashes: &[u64], now: Instant) -> usize {
        let Some(h) = self.workers.get(worker) else { return 0 };
        hashes.iter().take_while(|x| h.blocks.contains(x) || h.pending.get(x).is_some_and(|t| *t > now)).count()
    }

    /// For every known worker, the leading blocks of `hashes` it holds (see `overlap`).
    pub fn lookup(&self, hashes: &[u64], now: Instant) -> Vec<(WorkerId, usize)> {
        let mut out: Vec<(WorkerId, usize)> =
            self.workers.keys().map(|w| (w.clone(), self.overlap(w, hashes, now))).collect();
        out.sort();
        out
    }

    /// Blocks `worker`'s events say it holds (pending ones not counted).
    pub fn blocks(&self, worker: &WorkerId) -> usize {
        self.workers.get(worker).map_or(0, |h| h.blocks.len())
    }

    /// Every known worker with the blocks its events say it holds.
    pub fn sizes(&self) -> Vec<(WorkerId, usize)> {
        self.workers.iter().map(|(w, h)| (w.clone(), h.blocks.len())).collect()
    }

    /// Whether `worker`'s opening snapshot has been read whole.
    pub fn synced(&self, worker: &WorkerId) -> bool {
        self.workers.get(worker).is_some_and(|h| h.synced)
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
