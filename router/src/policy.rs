//! Which worker gets a request. A policy sees the candidates of one role with their last
//! load report, the router's own count of requests it sent them, and how much of the
//! prompt each is predicted to hold in its prefix cache (the router's prefix index).
//! `cache-aware` weighs the prompt tokens a worker would have to compute against its load;
//! `least-loaded` and `round-robin` ignore the cache.

use std::sync::atomic::{AtomicUsize, Ordering};

use tandem_cluster::WorkerDescriptor;
use tandem_proto::tandem::worker::v1 as pb;

/// One worker as a policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub worker: &'a WorkerDescriptor,
    /// The worker's last load report, if it has answered one.
    pub stats: Option<&'a pb::StatsResponse>,
    /// Requests this router has in flight on the worker now.
    pub inflight: u64,
    /// Prompt tokens this router has sent the worker to compute and it has not answered
    /// yet (each request's predicted uncached part).
    pub inflight_tokens: u64,
    /// Prompt tokens the worker is predicted to find in its prefix cache (the leading
    /// blocks the index says it holds, or that were just sent it). `None`: the worker
    /// hashes blocks differently from this router, so nothing is known (load only).
    pub cached_tokens: Option<usize>,
    /// Blocks the prefix index says the worker caches in all (0 when unknown).
    pub indexed_blocks: usize,
}

/// Picks among candidates (never empty); returns an index into them.
pub trait RoutingPolicy: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn pick_prefill(&self, candidates: &[Candidate<'_>], prompt_len: usize) -> usize;
    fn pick_decode(&self, candidates: &[Candidate<'_>], prompt_len: usize) -> usize;
    /// A role-`both` worker that prefills and decodes the request itself.
    fn pick_local(&self, candidates: &[Candidate<'_>], prompt_len: usize) -> usize {
        self.pick_decode(candidates, prompt_len)
    }
}

/// Each role's workers in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    prefill: AtomicUsize,
    decode: AtomicUsize,
}

impl RoutingPolicy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }
    fn pick_prefill(&self, c: &[Candidate<'_>], _: usize) -> usize {
        self.prefill.fetch_add(1, Ordering::Relaxed) % c.len()
    }
    fn pick_decode(&self, c: &[Candidate<'_>], _: usize) -> usize {
        self.decode.fetch_add(1, Ordering::Relaxed) % c.len()
    }
}

/// Prefill: the fewest prompt tokens queued. Decode: the lowest KV-cache use.
/// Both add the requests this router has in flight on the worker, which are live
/// (reports are up to a poll old), so a burst spreads out instead of landing on
/// the worker that looked idle at the last report.
#[derive(Debug, Default)]
pub struct LeastLoaded;

/// Tokens a request in flight is assumed to add to a prefill queue.
const INFLIGHT_PREFILL_TOKENS: u64 = 256;
/// A full KV cache weighs as much as this many requests in flight.
const FULL_CACHE_REQUESTS: f64 = 64.0;

fn argmin(c: &[Candidate<'_>], score: impl Fn(&Candidate<'_>) -> f64) -> usize {
    argmin_by(c, |w| [score(w), 0.0, 0.0])
}

/// The candidate with the lowest `[cost, tie-break, tie-break]` (in that order); the first
/// of equals.
fn argmin_by(c: &[Candidate<'_>], score: impl Fn(&Candidate<'_>) -> [f64; 3]) -> usize {
    let mut best = 0;
    let mut best_score = score(&c[0]);
    for (i, w) in c.iter().enumerate().skip(1) {
        let s = score(w);
        if s.partial_cmp(&best_score) == Some(std::cmp::Ordering::Less) {
            (best, best_score) = (i, s);
        }
    }
    best
}

/// A prefill queue's length in tokens: reported queued tokens plus the requests this
/// router has sent since, at `INFLIGHT_PREFILL_TOKENS` each.
fn prefill_load(w: &Candidate<'_>) -> f64 {
    (w.stats.map_or(0, |s| s.queued_prefill_tokens) + w.inflight * INFLIGHT_PREFILL_TOKENS) as f64
}

/// A decode worker's load in requests: its KV use (a full cache weighs
/// `FULL_CACHE_REQUESTS`) plus the requests this router has in flight on it.
fn decode_load(w: &Candidate<'_>) -> f64 {
    let usage = w
        .stats
        .filter(|s| s.kv_blocks_total > 0)
        .map_or(0.0, |s| (s.kv_blocks_used as f64) / (s.kv_blocks_total as f64));
    usage * FULL_CACHE_REQUESTS + w.inflight as f64
}

impl RoutingPolicy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }
    fn pick_prefill(&self, c: &[Candidate<'_>], _: usize) -> usize {
        argmin(c, prefill_load)
    }
    fn pick_decode(&self, c: &[Candidate<'_>], _: usize) -> usize {
        argmin(c, decode_load)
    }
}

/// Follows the prefix cache, held back by load. A candidate's cost is the prompt tokens it
/// would have to compute (those it is not predicted to hold), times `weight`, plus its load
/// in the same unit, tokens of prefill work:
/// - a prefill worker: its prefill queue (`queued_tokens`);
/// - a decode worker: `DECODE_REQUEST_TOKENS` per request in flight, plus
///   `FULL_POOL_TOKENS` times the square of its KV use (cheap while the pool has room, steep
///   as it fills and admission would wait or preempt); its own cache counts at
///   `DECODE_CACHE_SHARE` of the weight, since a block it holds is neither sent nor allocated
///   again, but no prefill is saved there;
/// - a role-`both` worker: both loads, and its cache at full weight.
///
/// Not least-loaded's decode measure (a full pool weighs 64 requests): with small pools a
/// single running request would outweigh a whole prompt, and every prefix would be spread.
///
/// The default weight, 2 (`--cache-weight`), makes a prompt token to compute cost twice a
/// queued one: computing a prefix again costs the cluster that work, not only this request
/// its wait. So requests that share a new prefix and arrive together follow the first one
/// (its blocks pending there) instead of splitting once its queue equals their prompt.
///
/// Ties go to the lower load, then to the worker whose prefix cache holds the fewest blocks,
/// then to the first in id order: a prefix no worker holds goes where it evicts least, so
/// new prefixes spread over the cluster's pools instead of piling onto the first idle
/// worker and evicting each other there. A hot prefix does not
/// pile onto one worker: once its queue is longer than the prefix, another worker computes
/// the prefix too, and from then on both hold it. With no sharing, every candidate's
/// prompt term is the same and the load decides, as under `least-loaded`.
#[derive(Debug)]
pub struct CacheAware {
    /// How much a prompt token to compute weighs against a token of queued work.
    pub weight: f64,
}

/// The share of the cache weight a decode worker's own cache gets (see `CacheAware`).
const DECODE_CACHE_SHARE: f64 = 0.1;
/// What a request decoding on a worker weighs, in tokens of prefill work.
const DECODE_REQUEST_TOKENS: f64 = 128.0;
/// What a full KV pool weighs, in tokens of prefill work (times the square of its use).
const FULL_POOL_TOKENS: f64 = 4096.0;

impl CacheAware {
    fn to_compute(&self, w: &Candidate<'_>, prompt_len: usize) -> f64 {
        self.weight * prompt_len.saturating_sub(w.cached_tokens.unwrap_or(0)) as f64
    }
}

/// A prefill queue in tokens as `cache-aware` sees it: the larger of the reported queue
/// and the uncached tokens this router has sent since and not seen answered. Not their sum:
/// once a request reaches the worker it is in both, and a burst of siblings whose prefix is
/// pending adds only their short suffixes, not a flat amount each.
fn queued_tokens(w: &Candidate<'_>) -> f64 {
    w.stats.map_or(0, |s| s.queued_prefill_tokens).max(w.inflight_tokens) as f64
}

/// A decode worker's load in tokens of prefill work (see `CacheAware`).
fn decode_tokens(w: &Candidate<'_>) -> f64 {
    let usage = w
        .stats
        .filter(|s| s.kv_blocks_total > 0)
        .map_or(0.0, |s| (s.kv_blocks_used as f64) / (s.kv_blocks_total as f64));
    DECODE_REQUEST_TOKENS * w.inflight as f64 + FULL_POOL_TOKENS * usage * usage
}

impl RoutingPolicy for CacheAware {
    fn name(&self) -> &'static str {
        "cache-aware"
    }
    fn pick_prefill(&self, c: &[Candidate<'_>], prompt_len: usize) -> usize {
        argmin_by(c, |w| [self.to_compute(w, prompt_len) + queued_tokens(w), queued_tokens(w), w.indexed_blocks as f64])
    }
    fn pick_decode(&self, c: &[Candidate<'_>], prompt_len: usize) -> usize {
        argmin_by(c, |w| {
            let load = decode_tokens(w);
            [DECODE_CACHE_SHARE * self.to_compute(w, prompt_len) + load, load, w.indexed_blocks as f64]
        })
    }
    fn pick_local(&self, c: &[Candidate<'_>], prompt_len: usize) -> usize {
        let load = |w: &Candidate<'_>| queued_tokens(w) + decode_tokens(w);
        argmin_by(c, |w| [self.to_compute(w, prompt_len) + load(w), load(w), w.indexed_blocks as f64])
    }
}

/// The policy names `policy_by_name` knows.
pub const POLICIES: [&str; 3] = ["cache-aware", "least-loaded", "round-robin"];

/// A policy by name: `cache-aware` (with `cache_weight`), `least-loaded` or `round-robin`.
pub fn policy_by_name(name: &str, cache_weight: f64) -> Option<Box<dyn RoutingPolicy>> {
    match name {
        "round-robin" => Some(Box::new(RoundRobin::default())),
        "least-loaded" => Some(Box::new(LeastLoaded)),
        "cache-aware" => Some(Box::new(CacheAware { weight: cache_weight })),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_cluster::{KvEndpoints, ModelInfo, Role, WorkerId};

    fn worker(id: &str) -> WorkerDescriptor {
        WorkerDescriptor {
            id: WorkerId::new(id).unwrap(),
            role: Role::Decode,
            grpc_addr: "127.0.0.1:1".into(),
            kv: KvEndpoints { tcp: "127.0.0.1:2".parse().unwrap(), local: None },
            model: ModelInfo { name: "m".into(), fingerprint: 1 },
            block_size: 16,
            hash_scheme: Some("sha256-chain-v1".into()),
            context_length: 8192,
            lease: None,
        }
    }

    fn stats(queued: u64, used: u32) -> pb::StatsResponse {
        pb::StatsResponse {
            queued_prefill_tokens: queued,
            kv_blocks_used: used,
            kv_blocks_total: 100,
            ..Default::default()
        }
    }

    #[test]
    fn round_robin_takes_turns() {
        let ws = [worker("a"), worker("b"), worker("c")];
        let c: Vec<Candidate> = ws
            .iter()
            .map(|w| Candidate {
                worker: w,
                stats: None,
                inflight: 0,
                inflight_tokens: 0,
                cached_tokens: Some(0),
                indexed_blocks: 0,
            })
            .collect();
        let p = RoundRobin::default();
        let picks: Vec<usize> = (0..6).map(|_| p.pick_decode(&c, 10)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert_eq!(p.pick_prefill(&c, 10), 0, "each role has its own turn");
    }

    #[test]
    fn least_loaded_follows_reports_and_inflight() {
        let ws = [worker("a"), worker("b")];
        let (s0, s1) = (stats(1000, 80), stats(10, 20));
        let c = [
            Candidate {
                worker: &ws[0],
                stats: Some(&s0),
                inflight: 0,
                inflight_tokens: 0,
                cached_tokens: None,
                indexed_blocks: 0,
            },
            Candidate {
                worker: &ws[1],
                stats: Some(&s1),
                inflight: 0,
                inflight_tokens: 0,
                cached_tokens: None,
                indexed_blocks: 0,
            },
        ];
        assert_eq!(LeastLoaded.pick_prefill(&c, 10), 1);
        assert_eq!(LeastLoaded.pick_decode(&c, 10), 1);
        // Requests in flight count before the next report.
        let c = [
            Candidate {
                worker: &ws[0],
                stats: Some(&s1),
                inflight: 0,
                inflight_tokens: 0,
                cached_tokens: None,
                indexed_blocks: 0,
            },
            Candidate {
                worker: &ws[1],
                stats: Some(&s1),
                inflight: 3,
                inflight_tokens: 0,
                cached_tokens: None,
                indexed_blocks: 0,
            },
        ];
        assert_eq!(LeastLoaded.pick_prefill(&c, 10), 0);
        assert_eq!(LeastLoaded.pick_decode(&c, 10), 0);
    }

    #[test]
    fn policies_by_name() {
        for name in POLICIES {
            assert_eq!(policy_by_name(name, 1.0).unwrap().name(), name);
        }
        assert!(policy_by_name("random", 1.0).is_none());
    }

    /// One candidate per row: (queued prefill tokens, KV blocks used of 100, in flight,
    /// predicted cached tokens).
    type Row = (u64, u32, u64, Option<usize>);

    fn pick(rows: &[Row], prompt_len: usize, stage: &str) -> usize {
        let ws: Vec<WorkerDescriptor> = (0..rows.len()).map(|i| worker(&format!("w{i}"))).collect();
        let st: Vec<pb::StatsResponse> = rows.iter().map(|r| stats(r.0, r.1)).collect();
        let c: Vec<Candidate> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| Candidate {
                worker: &ws[i],
                stats: Some(&st[i]),
                inflight: r.2,
                inflight_tokens: r.2 * INFLIGHT_PREFILL_TOKENS,
                cached_tokens: r.3,
                indexed_blocks: 0,
            })
            .collect();
        let p = CacheAware { weight: 2.0 };
        match stage {
            "prefill" => p.pick_prefill(&c, prompt_len),
            "decode" => p.pick_decode(&c, prompt_len),
            _ => p.pick_local(&c, prompt_len),
        }
    }

    #[test]
    fn cache_aware_weighs_the_cache_against_the_load() {
        // (stage, prompt tokens, candidates, the pick, why)
        let cases: Vec<(&str, usize, Vec<Row>, usize, &str)> = vec![
            ("prefill", 1000, vec![(0, 0, 0, Some(0)), (0, 0, 0, Some(960))], 1, "the holder of the prefix"),
            ("prefill", 1000, vec![(0, 0, 0, Some(0)), (300, 0, 1, Some(960))], 1, "a short queue is worth it"),
            ("prefill", 1000, vec![(0, 0, 0, Some(0)), (2500, 0, 2, Some(960))], 0, "a hot prefix spills over"),
            ("prefill", 1000, vec![(0, 0, 0, Some(0)), (0, 0, 3, Some(960))], 1, "reports and in flight overlap"),
            ("prefill", 1000, vec![(100, 0, 0, Some(0)), (0, 0, 0, Some(0))], 1, "no sharing: the load decides"),
            ("prefill", 1000, vec![(0, 0, 1, Some(0)), (0, 0, 0, Some(0))], 1, "in flight counts before reports"),
            ("prefill", 1000, vec![(0, 0, 0, None), (50, 0, 0, Some(0))], 0, "unknown hashing: load only"),
            ("prefill", 1000, vec![(0, 0, 0, None), (0, 0, 0, Some(512))], 1, "unknown is not a hit"),
            ("prefill", 100, vec![(10, 0, 0, Some(0)), (0, 0, 0, Some(0)), (0, 0, 0, Some(0))], 1, "first of equals"),
            ("decode", 1000, vec![(0, 10, 0, Some(0)), (0, 10, 0, Some(960))], 1, "its own cache counts"),
            ("decode", 1000, vec![(0, 10, 0, Some(0)), (0, 60, 1, Some(960))], 0, "but less than its load"),
            ("decode", 1000, vec![(0, 50, 0, Some(0)), (0, 10, 0, Some(0))], 1, "the emptier pool"),
            (
                "decode",
                1000,
                vec![(0, 10, 2, Some(0)), (0, 10, 0, Some(960))],
                1,
                "requests in flight, not only the pool",
            ),
            ("local", 1000, vec![(0, 0, 0, Some(0)), (0, 40, 1, Some(960))], 1, "a small pool's one request neither"),
            ("local", 1000, vec![(0, 10, 0, Some(0)), (0, 10, 0, Some(960))], 1, "a both worker's hit saves prefill"),
            ("local", 1000, vec![(0, 10, 0, Some(0)), (0, 10, 6, Some(960))], 0, "unless it is busy"),
            ("local", 1000, vec![(2000, 10, 0, Some(960)), (0, 10, 0, Some(0))], 1, "or its queue is long"),
        ];
        for (stage, len, rows, want, why) in cases {
            assert_eq!(pick(&rows, len, stage), want, "{stage}: {why}: {rows:?}");
        }
    }

    #[test]
    fn a_prefix_nobody_holds_goes_where_it_evicts_least() {
        let ws: Vec<WorkerDescriptor> = (0..3).map(|i| worker(&format!("w{i}"))).collect();
        let st = stats(0, 0);
        // (blocks each worker caches, the pick)
        for (held, want) in [([120, 40, 80], 1), ([0, 0, 0], 0), ([90, 90, 10], 2)] {
            let c: Vec<Candidate> = (0..3)
                .map(|i| Candidate {
                    worker: &ws[i],
                    stats: Some(&st),
                    inflight: 0,
                    inflight_tokens: 0,
                    cached_tokens: Some(0),
                    indexed_blocks: held[i],
                })
                .collect();
            let p = CacheAware { weight: 2.0 };
            assert_eq!(p.pick_prefill(&c, 1000), want, "{held:?}");
            assert_eq!(p.pick_local(&c, 1000), want, "{held:?}");
            assert_eq!(p.pick_decode(&c, 1000), want, "{held:?}");
        }
    }

    #[test]
    fn cache_aware_without_sharing_follows_the_load_alone() {
        // With no worker holding anything, the prompt term is the same for every candidate:
        // the pick is the least loaded by cache-aware's own measure.
        let ws: Vec<WorkerDescriptor> = (0..3).map(|i| worker(&format!("w{i}"))).collect();
        let mut rng = 7u64;
        let mut next = |n: u64| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) % n
        };
        for _ in 0..500 {
            let st: Vec<pb::StatsResponse> = (0..3).map(|_| stats(next(4000), next(100) as u32)).collect();
            let inflight: Vec<(u64, u64)> = (0..3).map(|_| (next(6), next(3000))).collect();
            let c: Vec<Candidate> = (0..3)
                .map(|i| Candidate {
                    worker: &ws[i],
                    stats: Some(&st[i]),
                    inflight: inflight[i].0,
                    inflight_tokens: inflight[i].1,
                    cached_tokens: Some(0),
                    indexed_blocks: 0,
                })
                .collect();
            let p = CacheAware { weight: 2.0 };
            assert_eq!(p.pick_prefill(&c, 500), argmin(&c, queued_tokens), "{st:?} {inflight:?}");
            assert_eq!(p.pick_decode(&c, 500), argmin(&c, decode_tokens), "{st:?} {inflight:?}");
            let load = |w: &Candidate<'_>| queued_tokens(w) + decode_tokens(w);
            assert_eq!(p.pick_local(&c, 500), argmin(&c, load), "{st:?} {inflight:?}");
        }
    }
}
