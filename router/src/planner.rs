//! The planner (`--planner`): decides each model's prefill/decode split from what the
//! router sees, and moves it by changing elastic workers' roles (`SetRole`). On
//! Kubernetes it also publishes the split it wants, `tandem_planner_desired_workers{role}`,
//! for a HorizontalPodAutoscaler per role.
//!
//! Every interval it looks, per model, at the workers (roles, whether elastic, prefills in
//! flight, queued prefill tokens) and at the requests routed and finished lately (the
//! share of long prompts, TTFT and TPOT p90 against the SLOs, the measured prefill rate).
//! [`want`] turns that into the number of prefill workers wanted, with a reason:
//!
//! - no prefill worker, and most prompts long while TPOT suffers: one (long prefills stop
//!   stalling the decodes);
//! - prefill workers, and few long prompts: one fewer (its core decodes instead);
//! - the prefill queue's wait past half the TTFT SLO while decodes have TPOT headroom: one
//!   more.
//!
//! [`Planner::step`] then applies hysteresis: the same want for `confirm` intervals in a
//! row, at least `dwell` since the model's last change and since the chosen worker's, and
//! one worker at a time. A prefill worker flips to `both` (it keeps prefilling when the
//! router places a prompt on it locally); a decode-capable one to `prefill`. A worker with
//! KV exports in flight is never the one removed from prefill, and the published count
//! does not drop below the prefill workers with exports in flight.
//!
//! It also rebalances decodes ([`rebalance`]): when one decode-capable worker's KV use is
//! at or above `rebalance_high` while another's is at or below `rebalance_low`, the first is
//! asked (`Migrate` `REQUEST`) to move its longest-running decodes to the second, live,
//! enough of them to bring the two halfway together (at most `MAX_MOVES` an interval, and
//! not again from that worker within `rebalance_dwell`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::{Role, WorkerId};
use tandem_proto::tandem::worker::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::members::{Members, WorkerStatus};
use crate::metrics;
use crate::placement::{share, PlacementControl, Slo};

/// How the planner runs.
#[derive(Debug, Clone, Copy)]
pub struct PlannerConfig {
    /// How often it looks.
    pub interval: Duration,
    /// Least time between two changes of one model's split (and of one worker's role).
    pub dwell: Duration,
    /// Intervals in a row a want must hold before it is acted on.
    pub confirm: u32,
    /// An uncached prompt longer than this is long (the placement threshold).
    pub long_prompt: usize,
    /// How long a role change may drain before it is given up.
    pub flip_deadline: Duration,
    /// A decode worker whose KV use (blocks used / total) is at least this has decodes
    /// moved off it, to one at or below `rebalance_low`. Above 1: never.
    pub rebalance_high: f64,
    pub rebalance_low: f64,
    /// Least time between two rebalancing moves off one worker.
    pub rebalance_dwell: Duration,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            interval: Duration::from_secs(1),
            dwell: Duration::from_secs(30),
            confirm: 3,
            long_prompt: 256,
            flip_deadline: Duration::from_secs(60),
            rebalance_high: 0.8,
            rebalance_low: 0.5,
            rebalance_dwell: Duration::from_secs(5),
        }
    }
}

/// What the planner sees of one model's traffic lately.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    /// Prompts routed within the window.
    pub prompts: usize,
    /// Of those, the share whose uncached part is long.
    pub long_share: f64,
    /// TTFT and TPOT p90 over finished requests.
    pub ttft_p90: Option<Duration>,
    pub tpot_p90: Option<Duration>,
    /// Prompt tokens a second one prefill computes, measured.
    pub prefill_rate: Option<f64>,
}

/// One worker as the planner sees it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: WorkerId,
    pub role: Role,
    pub elastic: bool,
    /// Answers and takes work (not draining, fenced or changing role).
    pub serving: bool,
    pub prefills_in_flight: u32,
    pub queued_prefill_tokens: u64,
    pub running: u32,
    /// KV blocks in use over the pool (0 when unknown).
    pub kv_use: f64,
}

/// Most decodes one rebalancing asks to move at a time.
pub const MAX_MOVES: u32 = 4;

/// Decodes to move from one worker to another (`rebalance`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebalance {
    pub from: WorkerId,
    pub to: WorkerId,
    pub count: u32,
}

/// Whether some of `workers`' decodes should move, and where: from the decode-capable
/// worker with the highest KV use, if at least `high`, to the one with the lowest, if at
/// most `low`; as many of its running decodes as brings the two halfway together (assuming
/// an equal share of its KV each), at least one and at most `MAX_MOVES`.
pub fn rebalance(workers: &[Seen], high: f64, low: f64) -> Option<Rebalance> {
    let decoding: Vec<&Seen> = workers.iter().filter(|w| w.role.can_decode() && w.serving).collect();
    let hot = decoding.iter().max_by(|a, b| a.kv_use.total_cmp(&b.kv_use).then(b.id.cmp(&a.id)))?;
    let cold = decoding.iter().min_by(|a, b| a.kv_use.total_cmp(&b.kv_use).then(a.id.cmp(&b.id)))?;
    if hot.id == cold.id || hot.kv_use < high || cold.kv_use > low || hot.running < 2 {
        return None;
    }
    let share = (hot.kv_use - cold.kv_use) / 2.0 / hot.kv_use;
    let count = ((hot.running as f64 * share).round() as u32).clamp(1, MAX_MOVES.min(hot.running - 1));
    Some(Rebalance { from: hot.id.clone(), to: cold.id.clone(), count })
}

/// The number of prefill workers wanted among `workers`, and why.
pub fn want(workers: &[Seen], t: &Traffic, slo: Slo) -> (usize, &'static str) {
    let n = workers.len();
    let prefill: Vec<&Seen> = workers.iter().filter(|w| w.role == Role::Prefill).collect();
    let p = prefill.len();
    if n < 2 || t.prompts < 4 {
        return (p, if n < 2 { "one_worker" } else { "idle" });
    }
    let tpot = t.tpot_p90.map_or(0.0, |d| share(d, slo.tpot));
    if p == 0 {
        if t.long_share >= 0.5 && tpot >= 0.5 {
            return (1, "long_prompts_stall_decodes");
        }
        return (0, "steady");
    }
    if t.long_share < 0.2 {
        return (p - 1, "short_prompts");
    }
    let queued: u64 = prefill.iter().map(|w| w.queued_prefill_tokens).sum();
    let wait = t.prefill_rate.filter(|r| *r > 0.0).map_or(0.0, |r| queued as f64 / (r * p as f64));
    if wait >= 0.5 * slo.ttft.as_secs_f64() && tpot < 0.5 && p + 1 < n {
        return (p + 1, "prefill_queue");
    }
    (p, "steady")
}

/// A role change the planner asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flip {
    pub worker: WorkerId,
    pub to: Role,
}

/// What the planner remembers between intervals, per model.
#[derive(Debug, Default)]
struct ModelPlan {
    /// The last want that differed from the split, and for how many intervals in a row.
    pending: Option<(usize, u32)>,
    /// When the split last changed.
    changed: Option<Instant>,
}

/// The planner's state: hysteresis per model, the last change per worker.
#[derive(Debug)]
pub struct Planner {
    pub config: PlannerConfig,
    models: HashMap<String, ModelPlan>,
    flipped: HashMap<WorkerId, Instant>,
    /// When decodes were last moved off each worker.
    rebalanced: HashMap<WorkerId, Instant>,
}

/// What one interval decided for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Prefill workers wanted (published).
    pub desired_prefill: usize,
    /// The change to make now, if any.
    pub flip: Option<Flip>,
    /// `hold`, `confirming`, `dwell`, `no_elastic_worker`, `to_prefill`, `to_both`.
    pub action: &'static str,
    pub reason: &'static str,
}

impl Planner {
    pub fn new(config: PlannerConfig) -> Planner {
        Planner { config, models: HashMap::new(), flipped: HashMap::new(), rebalanced: HashMap::new() }
    }

    /// `rebalance` for one model's `workers` at `now`, unless the hot worker had decodes
    /// moved off it within `rebalance_dwell`.
    pub fn rebalance(&mut self, workers: &[Seen], now: Instant) -> Option<Rebalance> {
        let c = &self.config;
        let r = rebalance(workers, c.rebalance_high, c.rebalance_low)?;
        if self.rebalanced.get(&r.from).is_some_and(|at| now.duration_since(*at) < c.rebalance_dwell) {
            return None;
        }
        self.rebalanced.insert(r.from.clone(), now);
        Some(r)
    }

    /// One interval for `model`, whose workers are `workers`, at `now`.
    pub fn step(&mut self, model: &str, workers: &[Seen], t: &Traffic, slo: Slo, now: Instant) -> Step {
        let p = workers.iter().filter(|w| w.role == Role::Prefill).count();
        let (wanted, reason) = want(workers, t, slo);
        let exporting = workers.iter().filter(|w| w.role == Role::Prefill && w.prefills_in_flight > 0).count();
        let plan = self.models.entry(model.to_string()).or_default();
        let hold = |action, desired| Step { desired_prefill: desired, flip: None, action, reason };
        if wanted == p {
            plan.pending = None;
            return hold("hold", p);
        }
        // Never publish fewer prefill workers than are exporting KV now.
        let desired = wanted.max(exporting.min(p));
        let seen = match plan.pending {
            Some((w, k)) if w == wanted => k + 1,
            _ => 1,
        };
        plan.pending = Some((wanted, seen));
        if seen < self.config.confirm {
            return hold("confirming", desired);
        }
        let dwell = self.config.dwell;
        if plan.changed.is_some_and(|at| now.duration_since(at) < dwell) {
            return hold("dwell", desired);
        }
        let rested = |w: &&Seen| {
            w.elastic && w.serving && self.flipped.get(&w.id).is_none_or(|at| now.duration_since(*at) >= dwell)
        };
        let chosen = if wanted < p {
            // The idlest prefill worker with no export in flight becomes `both`.
            workers
                .iter()
                .filter(|w| w.role == Role::Prefill && w.prefills_in_flight == 0)
                .filter(rested)
                .min_by_key(|w| (w.queued_prefill_tokens, w.id.clone()))
                .map(|w| Flip { worker: w.id.clone(), to: Role::Both })
        } else {
            // The decode-capable worker running least becomes a prefill worker, keeping one
            // that decodes.
            workers
                .iter()
                .filter(|w| w.role.can_decode())
                .filter(rested)
                .min_by_key(|w| (w.running, w.id.clone()))
                .map(|w| Flip { worker: w.id.clone(), to: Role::Prefill })
        };
        let Some(flip) = chosen else {
            let why = if wanted < p && exporting == p { "exports_in_flight" } else { "no_elastic_worker" };
            return Step { desired_prefill: desired, flip: None, action: "blocked", reason: why };
        };
        plan.pending = None;
        plan.changed = Some(now);
        self.flipped.insert(flip.worker.clone(), now);
        let action = if flip.to == Role::Prefill { "to_prefill" } else { "to_both" };
        Step { desired_prefill: desired, flip: Some(flip), action, reason }
    }
}

/// The split to publish for `workers` when `desired_prefill` prefill workers are wanted:
/// (prefill, decode-capable). Where a worker is elastic, roles change and the total stays:
/// decode = the rest. Where none is (pods of fixed roles, scaled by an autoscaler per role), a
/// prefill worker is added without taking a decode worker away, and one removed gives its
/// place to a decode worker.
pub fn published_split(workers: &[Seen], desired_prefill: usize) -> (usize, usize) {
    let p = workers.iter().filter(|w| w.role == Role::Prefill).count();
    let decode = workers.len() - p;
    if workers.iter().any(|w| w.elastic) {
        return (desired_prefill, workers.len().saturating_sub(desired_prefill));
    }
    (desired_prefill, decode + p.saturating_sub(desired_prefill))
}

/// The workers of each model, as the planner sees them.
fn by_model(snapshot: Vec<WorkerStatus>) -> HashMap<String, Vec<Seen>> {
    let mut out: HashMap<String, Vec<Seen>> = HashMap::new();
    for w in snapshot {
        let s = w.stats.unwrap_or_default();
        let seen = Seen {
            id: w.desc.id.clone(),
            role: w.desc.role,
            elastic: s.elastic,
            serving: w.healthy && !s.changing_role,
            prefills_in_flight: s.prefills_in_flight,
            queued_prefill_tokens: s.queued_prefill_tokens,
            running: s.running,
            kv_use: if s.kv_blocks_total > 0 { s.kv_blocks_used as f64 / s.kv_blocks_total as f64 } else { 0.0 },
        };
        out.entry(w.desc.model.name.clone()).or_default().push(seen);
    }
    out
}

/// Runs the planner until `stop`: each interval, a step per model, and the flips it asks
/// for (one at a time per model, each bounded by `flip_deadline`).
pub async fn run(
    members: Arc<Members>,
    placement: Arc<PlacementControl>,
    config: PlannerConfig,
    stop: CancellationToken,
) {
    let mut planner = Planner::new(config);
    let mut flipping: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    // Each model's last published split: (prefill, decode-capable).
    let mut published: HashMap<String, (usize, usize)> = HashMap::new();
    let slo = placement.config.slo;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = stop.cancelled() => break,
        }
        let (prompts, long_share) = placement.prompts_longer_than(config.long_prompt);
        let recent = placement.recent();
        let traffic = Traffic {
            prompts,
            long_share,
            ttft_p90: recent.ttft_p90,
            tpot_p90: recent.tpot_p90,
            prefill_rate: placement.prefill_rate(),
        };
        flipping.retain(|_, h| !h.is_finished());
        let (mut prefill_total, mut decode_total) = (0, 0);
        for (model, workers) in by_model(members.snapshot()) {
            if flipping.contains_key(&model) {
                // What it wanted when the change began still stands.
                let (p, d) = published.get(&model).copied().unwrap_or_default();
                (prefill_total, decode_total) = (prefill_total + p, decode_total + d);
                metrics::planner_decision("wait", "role_change_in_progress");
                continue;
            }
            if let Some(r) = planner.rebalance(&workers, Instant::now()) {
                ask_moves(&members, r).await;
            }
            let step = planner.step(&model, &workers, &traffic, slo, Instant::now());
            let split = published_split(&workers, step.desired_prefill);
            published.insert(model.clone(), split);
            prefill_total += split.0;
            decode_total += split.1;
            metrics::planner_decision(step.action, step.reason);
            let inputs = format!(
                "prompts={} long_share={:.2} ttft_p90_ms={:?} tpot_p90_ms={:?} prefill_rate={:?}",
                traffic.prompts,
                traffic.long_share,
                traffic.ttft_p90.map(|d| d.as_millis()),
                traffic.tpot_p90.map(|d| d.as_millis()),
                traffic.prefill_rate.map(|r| r.round()),
            );
            let Some(flip) = step.flip else {
                tracing::debug!(model = %model, action = step.action, reason = step.reason, desired_prefill = step.desired_prefill, %inputs, "planner");
                continue;
            };
            tracing::info!(model = %model, worker = %flip.worker, to = %flip.to, reason = step.reason, %inputs, "planner: changing a worker's role");
            let Some(worker) = members.worker(&flip.worker) else { continue };
            let deadline = config.flip_deadline;
            flipping.insert(
                model,
                tokio::spawn(async move {
                    let req = pb::SetRoleRequest { role: flip.to.to_pb(), deadline_ms: Some(deadline.as_millis() as u32) };
                    match tokio::time::timeout(deadline + Duration::from_secs(10), worker.set_role(req)).await {
                        Ok(Ok(r)) => tracing::info!(worker = %flip.worker, to = %flip.to, drained_ms = r.drained_ms as u64, "planner: role changed"),
                        Ok(Err(e)) => tracing::warn!(worker = %flip.worker, to = %flip.to, error = %e, "planner: role change refused"),
                        Err(_) => tracing::warn!(worker = %flip.worker, to = %flip.to, "planner: role change did not answer in time"),
                    }
                }),
            );
        }
        metrics::desired_workers(prefill_total, decode_total);
    }
    for (_, h) in flipping {
        h.abort();
    }
}

/// Asks `r.from` to move `r.count` of its longest-running decodes to `r.to`, live.
async fn ask_moves(members: &Members, r: Rebalance) {
    let Some(worker) = members.worker(&r.from) else { return };
    let req = pb::MigrateRequest {
        step: pb::MigrateStep::Request as i32,
        count: r.count,
        to_worker: r.to.to_string(),
        ..Default::default()
    };
    match tokio::time::timeout(Duration::from_secs(5), worker.migrate(req)).await {
        Ok(Ok(a)) => {
            metrics::planner_decision("rebalance", "kv_use");
            tracing::info!(from = %r.from, to = %r.to, asked = a.request_ids.len(), "planner: moving decodes to even out KV use");
        }
        Ok(Err(e)) => tracing::info!(from = %r.from, error = %e, "planner: rebalancing refused"),
        Err(_) => tracing::warn!(from = %r.from, "planner: rebalancing did not answer in time"),
    }
}

#[cfg(test)]
#[path = "planner_tests.rs"]
mod tests;
