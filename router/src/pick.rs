//! One request's placement as a pure function: given the workers that could take it (each
//! with its last load report, what this router has in flight there and what the prefix
//! index predicts it caches), which prefill and decode worker it goes to, or which
//! role-`both` worker does it whole.
//!
//! `Members::route` calls it with the live cluster view; `tandem sim` calls it with
//! simulated workers and the simulator's clock, so both place requests by the same code.

use std::time::Instant;

use tandem_cluster::{Role, WorkerDescriptor};
use tandem_proto::tandem::worker::v1 as pb;
use tonic::Status;

use crate::metrics;
use crate::placement::{Placement, PlacementControl};
use crate::policy::{Candidate, RoutingPolicy};

/// One worker as a choice sees it.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub desc: &'a WorkerDescriptor,
    /// Its last load report, if it has answered one.
    pub stats: Option<&'a pb::StatsResponse>,
    /// Requests this router has in flight on it.
    pub inflight: u64,
    /// Prompt tokens this router has sent it to compute and not seen answered.
    pub inflight_tokens: u64,
    /// Prompt tokens it is predicted to hold in its prefix cache (`None`: it hashes blocks
    /// differently, so nothing is known).
    pub cached: Option<usize>,
    /// Blocks the prefix index says it caches in all.
    pub indexed_blocks: usize,
}

/// Where a request goes: indices into the lists `choose` was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Prefill on `prefill` (an index into the prefill list), decode on `decode`.
    Disaggregated { prefill: usize, decode: usize },
    /// The whole request on one worker of role `both` (an index into the decode list).
    Local(usize),
}

/// Which of a request's workers a pick is for.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    Prefill,
    Decode,
    /// A role-`both` worker doing the whole request.
    Local,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Prefill => "prefill",
            Stage::Decode => "decode",
            Stage::Local => "local",
        }
    }
}

/// The candidate `policy` picks among `ws` for `stage`, counted and logged.
fn pick_one(policy: &dyn RoutingPolicy, ws: &[Seen<'_>], stage: Stage, prompt_len: usize) -> usize {
    let c: Vec<Candidate> = ws
        .iter()
        .map(|w| Candidate {
            worker: w.desc,
            stats: w.stats,
            inflight: w.inflight,
            inflight_tokens: w.inflight_tokens,
            cached_tokens: w.cached,
            indexed_blocks: w.indexed_blocks,
        })
        .collect();
    let i = match stage {
        Stage::Prefill => policy.pick_prefill(&c, prompt_len),
        Stage::Decode => policy.pick_decode(&c, prompt_len),
        Stage::Local => policy.pick_local(&c, prompt_len),
    };
    // The chosen worker's predicted cached tokens beside the most any other was predicted
    // to hold (the runner-up by cache).
    let runner_up = ws.iter().enumerate().filter(|&(j, _)| j != i).filter_map(|(_, w)| w.cached).max();
    metrics::predicted_cached(stage.as_str(), ws[i].cached, runner_up);
    tracing::debug!(
        worker = %ws[i].desc.id,
        stage = stage.as_str(),
        policy = policy.name(),
        predicted_cached = ?ws[i].cached,
        runner_up_cached = ?runner_up,
        candidates = ws.len(),
        "placed"
    );
    i
}

/// Where a request of `prompt_len` tokens for `model` goes, among `prefill` workers and
/// `decode` workers (those that can decode: roles `decode` and `both`), each list already
/// the eligible ones, in id order. A decode worker of role `both` may prefill the request
/// itself (`placement`, at `now`); with no prefill worker, a role-`both` worker does.
pub fn choose(
    policy: &dyn RoutingPolicy,
    placement: &PlacementControl,
    model: &str,
    prompt_len: usize,
    prefill: &[Seen<'_>],
    decode: &[Seen<'_>],
    now: Instant,
) -> Result<Pick, Status> {
    if decode.is_empty() {
        return Err(Status::unavailable(format!("no decode worker serves {model:?}")));
    }
    if !prefill.is_empty() {
        let di = pick_one(policy, decode, Stage::Decode, prompt_len);
        let d = &decode[di];
        // The pair must agree on the model's weights and the KV block size.
        let matching: Vec<usize> = (0..prefill.len())
            .filter(|&i| {
                let p = prefill[i].desc;
                p.model.fingerprint == d.desc.model.fingerprint && p.block_size == d.desc.block_size
            })
            .collect();
        if matching.is_empty() {
            return Err(Status::unavailable(format!(
                "no prefill worker has the KV layout of decode worker {}",
                d.desc.id
            )));
        }
        let candidates: Vec<Seen> = matching.iter().map(|&i| prefill[i]).collect();
        let pi = matching[pick_one(policy, &candidates, Stage::Prefill, prompt_len)];
        let p = &prefill[pi];
        if d.desc.role == Role::Both {
            // A decode worker that can prefill: here or there, per request.
            let local = prompt_len.saturating_sub(d.cached.unwrap_or(0));
            let remote = prompt_len.saturating_sub(p.cached.unwrap_or(0));
            let queued = p.stats.map_or(0, |s| s.queued_prefill_tokens);
            let queue = queued.max(p.inflight_tokens) as f64;
            let running = d.stats.map_or(0, |s| s.running as u64);
            let decoding = running.max(d.inflight);
            if placement.place_at(local, remote, queue, decoding, now) == Placement::Local {
                return Ok(Pick::Local(di));
            }
        }
        return Ok(Pick::Disaggregated { prefill: pi, decode: di });
    }
    let both: Vec<usize> = (0..decode.len()).filter(|&i| decode[i].desc.role == Role::Both).collect();
    if both.is_empty() {
        return Err(Status::unavailable(format!(
            "no prefill worker serves {model:?} and no decode worker has role both"
        )));
    }
    let candidates: Vec<Seen> = both.iter().map(|&i| decode[i]).collect();
    Ok(Pick::Local(both[pick_one(policy, &candidates, Stage::Local, prompt_len)]))
}
