//! Which worker gets a request. A policy sees the candidates of one role with
//! their last load report and the router's own count of requests it sent them;
//! prefix-aware, shortest-job-first and fair policies plug in here later.

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
}

/// Picks among candidates (never empty); returns an index into them.
pub trait RoutingPolicy: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn pick_prefill(&self, candidates: &[Candidate<'_>], prompt_len: usize) -> usize;
    fn pick_decode(&self, candidates: &[Candidate<'_>], prompt_len: usize) -> usize;
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
    let mut best = 0;
    for i in 1..c.len() {
        if score(&c[i]) < score(&c[best]) {
            best = i;
        }
    }
    best
}

impl RoutingPolicy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }
    fn pick_prefill(&self, c: &[Candidate<'_>], _: usize) -> usize {
        argmin(c, |w| {
            let queued = w.stats.map_or(0, |s| s.queued_prefill_tokens);
            (queued + w.inflight * INFLIGHT_PREFILL_TOKENS) as f64
        })
    }
    fn pick_decode(&self, c: &[Candidate<'_>], _: usize) -> usize {
        argmin(c, |w| {
            let usage = w
                .stats
                .filter(|s| s.kv_blocks_total > 0)
                .map_or(0.0, |s| (s.kv_blocks_used as f64) / (s.kv_blocks_total as f64));
            usage * FULL_CACHE_REQUESTS + w.inflight as f64
        })
    }
}

/// A policy by name: `round-robin` or `least-loaded`.
pub fn policy_by_name(name: &str) -> Option<Box<dyn RoutingPolicy>> {
    match name {
        "round-robin" => Some(Box::new(RoundRobin::default())),
        "least-loaded" => Some(Box::new(LeastLoaded)),
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
        let c: Vec<Candidate> = ws.iter().map(|w| Candidate { worker: w, stats: None, inflight: 0 }).collect();
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
            Candidate { worker: &ws[0], stats: Some(&s0), inflight: 0 },
            Candidate { worker: &ws[1], stats: Some(&s1), inflight: 0 },
        ];
        assert_eq!(LeastLoaded.pick_prefill(&c, 10), 1);
        assert_eq!(LeastLoaded.pick_decode(&c, 10), 1);
        // Requests in flight count before the next report.
        let c = [
            Candidate { worker: &ws[0], stats: Some(&s1), inflight: 0 },
            Candidate { worker: &ws[1], stats: Some(&s1), inflight: 3 },
        ];
        assert_eq!(LeastLoaded.pick_prefill(&c, 10), 0);
        assert_eq!(LeastLoaded.pick_decode(&c, 10), 0);
    }

    #[test]
    fn policies_by_name() {
        assert_eq!(policy_by_name("round-robin").unwrap().name(), "round-robin");
        assert_eq!(policy_by_name("least-loaded").unwrap().name(), "least-loaded");
        assert!(policy_by_name("random").is_none());
    }
}
