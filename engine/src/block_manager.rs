//! The KV block manager: who owns which block, which blocks hold which
//! prefix, and which block is reused next.
//!
//! A pure data structure (no I/O, no locks). It owns:
//! - reference counts (a block may be shared by forks and by prefix hits);
//! - the free queue in eviction order: blocks nobody holds, oldest release
//!   first; blocks that never held a cached prefix go to the front, so cached
//!   prefixes are the last to be overwritten (LRU);
//! - the prefix cache: full blocks found by a 64-bit chained hash, each kept
//!   with its `PrefixKey` (128 bits of SHA-256 chained from the request's cache
//!   salt through every token up to the block's end) and its token ids; a hit
//!   re-checks both, so a hash collision, by chance or forged, across tenants
//!   or within one, is a miss, never another prefix's KV;
//! - the queue of `KvEvent`s (stored / removed) the worker publishes so a
//!   router can keep a global prefix index.
//!
//! It does not touch KV memory: copy-on-write returns the copies to make.

use std::collections::{BTreeMap, HashMap};

use crate::error::EngineError;
use crate::kv_cache::BlockId;
use tandem_text::prefix::{chain, root_key};
pub use tandem_text::prefix::{prefix_hashes, PrefixKey, SeqHash};

/// A change to the set of cached prefix blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// Blocks now cached, in prefix order; `parent` is the hash of the block before the first.
    Stored { parent: Option<SeqHash>, hashes: Vec<SeqHash> },
    /// Blocks evicted from the cache.
    Removed { hashes: Vec<SeqHash> },
}

/// One sequence's blocks, held by the scheduler for a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqBlocks {
    /// Append-only block table.
    pub table: Vec<BlockId>,
    /// How many leading blocks are registered in (or came from) the prefix cache.
    pub num_hashed: usize,
    /// Hash of block `num_hashed - 1`.
    pub last_hash: Option<SeqHash>,
    /// Key of block `num_hashed - 1`: where the next block's key and hash chain from.
    pub last_key: Option<PrefixKey>,
}

/// Prefix-cache lookups and hits, in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub queried_tokens: u64,
    pub hit_tokens: u64,
}

#[derive(Debug, Clone, Default)]
struct Meta {
    refs: u32,
    /// Set while the block is registered in the prefix cache.
    hash: Option<SeqHash>,
    /// Key of a cached block (its salt and its whole prefix), re-checked on every hit.
    key: PrefixKey,
    /// Token ids of a cached block, re-checked on every hit.
    tokens: Vec<u32>,
    /// Position in the free queue while `refs == 0`.
    free_key: Option<i64>,
}

/// The result of a prefix lookup; take it with `BlockManager::take_prefix`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixHit {
    pub blocks: Vec<BlockId>,
    pub hashes: Vec<SeqHash>,
    /// Key of the last hit block.
    pub last_key: Option<PrefixKey>,
}

impl PrefixHit {
    pub fn tokens(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }
}

#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    meta: Vec<Meta>,
    free: BTreeMap<i64, BlockId>,
    next_back: i64,
    next_front: i64,
    cached: HashMap<SeqHash, BlockId>,
    prefix_caching: bool,
    events: Vec<KvEvent>,
    stats: PrefixStats,
    /// Bits of each `SeqHash` kept: 64, or fewer under the test hook `with_hash_bits`.
    hash_bits: u32,
}

impl BlockManager {
    pub fn new(n_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        assert!(block_size > 0 && n_blocks <= u32::MAX as usize);
        let mut bm = BlockManager {
            block_size,
            meta: vec![Meta::default(); n_blocks],
            free: BTreeMap::new(),
            next_back: 1,
            next_front: 0,
            cached: HashMap::new(),
            prefix_caching,
            events: Vec::new(),
            stats: PrefixStats::default(),
            hash_bits: 64,
        };
        for i in 0..n_blocks {
            bm.push_free(BlockId(i as u32), false);
        }
        bm
    }

    /// Test hook: keeps only the low `bits` bits of every `SeqHash` (0: every block's hash
    /// is the same), so tests can make hashes collide at will, across salts and across token
    /// ids, and show that a collision is a miss: keys, not hashes, decide a hit. Events then
    /// name blocks by these shortened hashes, which `prefix_hashes` does not give.
    #[doc(hidden)]
    pub fn with_hash_bits(mut self, bits: u32) -> Self {
        assert!(bits <= 64);
        self.hash_bits = bits;
        self
    }

    /// `chain`, with the hash shortened under `with_hash_bits`.
    fn chain(&self, parent: PrefixKey, tokens: &[u32]) -> (PrefixKey, SeqHash) {
        let (key, h) = chain(parent, tokens);
        match self.hash_bits {
            64 => (key, h),
            bits => (key, SeqHash(h.0 & ((1u64 << bits) - 1))),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn n_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks that an allocation can take now (free, including evictable cached ones).
    pub fn n_free(&self) -> usize {
        self.free.len()
    }

    pub fn n_used(&self) -> usize {
        self.n_blocks() - self.n_free()
    }

    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.meta[id.0 as usize].refs
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// Hashes of every block the prefix cache holds now, in no particular order: what a
    /// new subscriber to the events starts from. Events not yet taken are already
    /// reflected here, so take them first.
    pub fn cached_hashes(&self) -> Vec<SeqHash> {
        self.cached.keys().copied().collect()
    }

    fn push_free(&mut self, id: BlockId, back: bool) {
        let key = if back {
            self.next_back += 1;
            self.next_back
        } else {
            self.next_front -= 1;
            self.next_front
        };
        self.meta[id.0 as usize].free_key = Some(key);
        self.free.insert(key, id);
    }

    fn unfree(&mut self, id: BlockId) {
        if let Some(k) = self.meta[id.0 as usize].free_key.take() {
            self.free.remove(&k);
        }
    }

    /// Longest run of cached full blocks that starts `tokens`, leaving at least
    /// one token to compute (its logits are needed). Counts toward the stats.
    pub fn lookup_prefix(&mut self, tokens: &[u32], salt: Option<&str>) -> PrefixHit {
        let mut hit = PrefixHit::default();
        if !self.prefix_caching || tokens.is_empty() {
            return hit;
        }
        self.stats.queried_tokens += tokens.len() as u64;
        let usable = &tokens[..tokens.len() - 1];
        let mut parent = root_key(salt);
        for blk in usable.chunks_exact(self.block_size) {
            let (key, h) = self.chain(parent, blk);
            match self.cached.get(&h).map(|&id| (id, &self.meta[id.0 as usize])) {
                Some((id, m)) if m.key == key && m.tokens == blk => {
                    hit.blocks.push(id);
                    hit.hashes.push(h);
                    hit.last_key = Some(key);
                    parent = key;
                }
                _ => break,
            }
        }
        self.stats.hit_tokens += (hit.blocks.len() * self.block_size) as u64;
        hit
    }

    /// Prompt tokens a lookup of `tokens` would find cached now, without counting it as a
    /// lookup (no stats change): how much of a queued request's prompt is likely not to be
    /// computed, for load reports.
    pub fn cached_prefix_tokens(&self, tokens: &[u32], salt: Option<&str>) -> usize {
        if !self.prefix_caching || tokens.is_empty() {
            return 0;
        }
        let usable = &tokens[..tokens.len() - 1];
        let mut parent = root_key(salt);
        let mut hit = 0;
        for blk in usable.chunks_exact(self.block_size) {
            let (key, h) = self.chain(parent, blk);
            match self.cached.get(&h).map(|&id| &self.meta[id.0 as usize]) {
                Some(m) if m.key == key && m.tokens == blk => {
                    hit += self.block_size;
                    parent = key;
                }
                _ => break,
            }
        }
        hit
    }

    /// How many free blocks taking `hit` would use up (hit blocks nobody holds).
    pub fn hit_cost(&self, hit: &PrefixHit) -> usize {
        hit.blocks.iter().filter(|b| self.meta[b.0 as usize].refs == 0).count()
    }

    /// Makes `hit` the start of an empty sequence's table.
    pub fn take_prefix(&mut self, seq: &mut SeqBlocks, hit: PrefixHit) {
        assert!(seq.table.is_empty(), "prefix hits start a sequence");
        for &id in &hit.blocks {
            let m = &mut self.meta[id.0 as usize];
            m.refs += 1;
            if m.refs == 1 {
                self.unfree(id);
            }
        }
        seq.num_hashed = hit.blocks.len();
        seq.last_hash = hit.hashes.last().copied();
        seq.last_key = hit.last_key;
        seq.table = hit.blocks;
    }

    /// Blocks `seq` still needs to hold `total_tokens`.
    pub fn blocks_needed(&self, seq: &SeqBlocks, total_tokens: usize) -> usize {
        total_tokens.div_ceil(self.block_size).saturating_sub(seq.table.len())
    }

    /// Grows `seq`'s table to hold `total_tokens`: all or nothing.
    pub fn allocate(&mut self, seq: &mut SeqBlocks, total_tokens: usize) -> Result<(), EngineError> {
        let need = self.blocks_needed(seq, total_tokens);
        if need > self.free.len() {
            return Err(EngineError::OutOfBlocks(format!("need {need} blocks, {} free", self.free.len())));
        }
        let mut removed = Vec::new();
        for _ in 0..need {
            let (_, id) = self.free.pop_first().expect("counted above");
            let m = &mut self.meta[id.0 as usize];
            m.free_key = None;
            m.refs = 1;
            if let Some(h) = m.hash.take() {
                m.tokens.clear();
                self.cached.remove(&h);
                removed.push(h);
            }
            seq.table.push(id);
        }
        if !removed.is_empty() {
            self.events.push(KvEvent::Removed { hashes: removed });
        }
        Ok(())
    }

    /// Registers the full blocks among the first `computed` tokens in the prefix cache.
    /// A block whose prefix is already cached elsewhere (computed twice at once) stays private.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32], computed: usize, salt: Option<&str>) {
        if !self.prefix_caching {
            return;
        }
        let full = (computed / self.block_size).min(seq.table.len());
        if full <= seq.num_hashed {
            return;
        }
        // One Stored event per run of newly cached blocks, each naming the hash before it.
        let mut parent = seq.last_hash;
        let mut stored = Vec::new();
        let mut prev = seq.last_key.unwrap_or_else(|| root_key(salt));
        for i in seq.num_hashed..full {
            let blk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let (key, h) = self.chain(prev, blk);
            prev = key;
            let id = seq.table[i];
            if !self.cached.contains_key(&h) && self.meta[id.0 as usize].hash.is_none() {
                let m = &mut self.meta[id.0 as usize];
                m.hash = Some(h);
                m.key = key;
                m.tokens = blk.to_vec();
                self.cached.insert(h, id);
                if stored.is_empty() {
                    parent = seq.last_hash;
                }
                stored.push(h);
            } else if !stored.is_empty() {
                self.events.push(KvEvent::Stored { parent, hashes: std::mem::take(&mut stored) });
            }
            seq.last_hash = Some(h);
            seq.last_key = Some(key);
        }
        seq.num_hashed = full;
        if !stored.is_empty() {
            self.events.push(KvEvent::Stored { parent, hashes: stored });
        }
    }

    /// Drops the sequence's hold on its blocks, tail first, so a prefix's
    /// deepest blocks are evicted before its root.
    pub fn free(&mut self, seq: &mut SeqBlocks) {
        for &id in seq.table.iter().rev() {
            let m = &mut self.meta[id.0 as usize];
            assert!(m.refs > 0, "double free of block {id:?}");
            m.refs -= 1;
            if m.refs == 0 {
                let cached = m.hash.is_some();
                self.push_free(id, cached);
            }
        }
        *seq = SeqBlocks::default();
    }

    /// A second owner of every block of `seq` (parallel sampling); writes go through `prepare_write`.
    pub fn fork(&mut self, seq: &SeqBlocks) -> SeqBlocks {
        for &id in &seq.table {
            self.meta[id.0 as usize].refs += 1;
        }
        seq.clone()
    }

    /// Before writing token position `pos`: if its block is shared, give `seq` a
    /// private copy. Returns the `(from, to)` copy to perform on the KV memory.
    pub fn prepare_write(
        &mut self,
        seq: &mut SeqBlocks,
        pos: usize,
    ) -> Result<Option<(BlockId, BlockId)>, EngineError> {
        let idx = pos / self.block_size;
        let Some(&old) = seq.table.get(idx) else { return Ok(None) };
        if self.meta[old.0 as usize].refs <= 1 {
            return Ok(None);
        }
        let (_, new) =
            self.free.pop_first().ok_or_else(|| EngineError::OutOfBlocks("no block for a copy-on-write".into()))?;
        let m = &mut self.meta[new.0 as usize];
        m.free_key = None;
        m.refs = 1;
        if let Some(h) = m.hash.take() {
            m.tokens.clear();
            self.cached.remove(&h);
            self.events.push(KvEvent::Removed { hashes: vec![h] });
        }
        self.meta[old.0 as usize].refs -= 1;
        seq.table[idx] = new;
        if idx < seq.num_hashed {
            // A private copy of a cached block is not itself registered. The
            // next commit re-walks the chain from the root (the hash of block
            // `idx - 1` is not kept), so the copy is never hashed as a root block.
            seq.num_hashed = 0;
            seq.last_hash = None;
            seq.last_key = None;
        }
        Ok(Some((old, new)))
    }

    /// Checks that reference counts equal the holders and every block is either held or free.
    pub fn check(&self, holders: &[&SeqBlocks]) -> Result<(), String> {
        let mut refs = vec![0u32; self.meta.len()];
        for s in holders {
            for id in &s.table {
                refs[id.0 as usize] += 1;
            }
        }
        for (i, m) in self.meta.iter().enumerate() {
            if m.refs != refs[i] {
                return Err(format!("block {i}: refs {} but {} holders", m.refs, refs[i]));
            }
            if (m.refs == 0) != m.free_key.is_some() {
                return Err(format!("block {i}: refs {} but free-queue membership {:?}", m.refs, m.free_key));
            }
            if let Some(h) = m.hash {
                if self.cached.get(&h) != Some(&BlockId(i as u32)) {
                    return Err(format!("block {i}: hash {h:?} not mapped back to it"));
                }
            }
        }
        if self.free.len() != self.meta.iter().filter(|m| m.refs == 0).count() {
            return Err("free queue length differs from unreferenced blocks".into());
        }
        if self.cached.len() != self.meta.iter().filter(|m| m.hash.is_some()).count() {
            return Err("cache map size differs from hashed blocks".into());
        }
        Ok(())
    }
}
