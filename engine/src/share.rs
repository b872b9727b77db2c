//! What the `fair` and `sjf` policies know: whose a request is and how long it is expected
//! to run ([`Share`]), and the tenants' virtual token counters ([`Vtc`]).
//!
//! Fairness is the Virtual Token Counter of Sheng et al. (OSDI'24): every tenant has a
//! counter of the weighted service it received; the waiting request of the tenant with the
//! least counter goes first; a tenant that becomes active is lifted to the least counter
//! among the active ones, so idleness is not banked. A prompt token costs `prefill_cost`,
//! a generated token `decode_cost`, and a tenant's weight divides both (a tenant of
//! weight 2 gets twice the service of one of weight 1 while both are backlogged).
//!
//! In a disaggregated cluster a prefill worker sees only prompt tokens and a decode worker
//! only generated ones. The router sums what every worker reports (`served`) into one
//! account per tenant and hands each request the tenant's service *elsewhere* (the
//! cluster's minus this worker's); a worker orders by its own counter plus that, so a
//! tenant that consumed the decode pool does not jump the prefill queue.
//!
//! Shortest job first ranks a request by its expected remaining work: prompt tokens left
//! to compute (at `PROMPT_PER_DECODE` a decode token) plus predicted output tokens left.
//! Waiting ages it: the rank drops by `aging` tokens a second of wait, and a request
//! that waited `max_wait` goes before every other (in arrival order), so nothing starves.

use std::collections::HashMap;
use std::sync::Arc;

/// Whose a request is and how long it is expected to run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Share {
    /// The tenant (the router's name for it); `None`: the default tenant.
    pub tenant: Option<Arc<str>>,
    /// Predicted output tokens (capped by `max_tokens`); `None`: no prediction.
    pub predicted_output: Option<u32>,
    /// The tenant's weighted service elsewhere in the cluster, as the router last saw it.
    pub elsewhere: f64,
}

/// The default tenant's key in the counters.
pub const DEFAULT_TENANT: &str = "";
/// Tenants tracked at most; the rest share one counter (`OVERFLOW_TENANT`).
pub const MAX_TENANTS: usize = 1024;
pub const OVERFLOW_TENANT: &str = "~other";

/// Prompt tokens a shortest-job-first rank counts as one decode token: a prompt token is
/// computed in a batch of hundreds, a decode token takes a step of its own.
pub const PROMPT_PER_DECODE: usize = 32;

/// Costs and weights of the `fair` policy.
#[derive(Debug, Clone, PartialEq)]
pub struct FairConfig {
    /// Service one prompt token costs.
    pub prefill_cost: f64,
    /// Service one generated token costs.
    pub decode_cost: f64,
    /// Tenant weights (default 1): service is charged divided by the weight.
    pub weights: HashMap<String, f64>,
}

impl Default for FairConfig {
    fn default() -> Self {
        // VTC's own choice: an output token costs twice an input token.
        FairConfig { prefill_cost: 1.0, decode_cost: 2.0, weights: HashMap::new() }
    }
}

impl FairConfig {
    fn weight(&self, tenant: &str) -> f64 {
        self.weights.get(tenant).copied().filter(|w| *w > 0.0).unwrap_or(1.0)
    }
}

/// Aging of the `sjf` policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SjfConfig {
    /// Rank (in decode tokens) a request gains per second of wait.
    pub aging: f64,
    /// A request that waited this long goes first, whatever its rank (ms).
    pub max_wait_ms: u64,
}

impl Default for SjfConfig {
    fn default() -> Self {
        SjfConfig { aging: 16.0, max_wait_ms: 30_000 }
    }
}

/// The stage a charge is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Prefill,
    Decode,
}

#[derive(Debug, Clone, Default)]
struct Tenant {
    /// The virtual counter: charged service plus lifts.
    counter: f64,
    /// Charged service only (what the worker reports).
    served: f64,
    /// Service elsewhere in the cluster, from the tenant's newest request.
    elsewhere: f64,
    /// Requests of it not finished.
    active: usize,
}

/// The tenants' virtual token counters.
#[derive(Debug, Clone, Default)]
pub struct Vtc {
    pub cfg: FairConfig,
    tenants: HashMap<Arc<str>, Tenant>,
}

impl Vtc {
    pub fn new(cfg: FairConfig) -> Self {
        Vtc { cfg, tenants: HashMap::new() }
    }

    /// The counter key of `tenant` (default tenant for `None`), bounded in number.
    fn name(&self, tenant: Option<&Arc<str>>) -> Arc<str> {
        let t = tenant.cloned().unwrap_or_else(|| Arc::from(DEFAULT_TENANT));
        if self.tenants.contains_key(&t) || self.tenants.len() < MAX_TENANTS - 1 {
            t
        } else {
            Arc::from(OVERFLOW_TENANT)
        }
    }

    /// What orders `tenant`'s requests: its counter plus its service elsewhere.
    pub fn key(&self, tenant: Option<&Arc<str>>) -> f64 {
        let t = self.name(tenant);
        self.tenants.get(&t).map_or(0.0, |x| x.counter + x.elsewhere)
    }

    /// A request of `tenant` arrives, with the tenant's service `elsewhere`. A tenant with
    /// none active until now is lifted to the least key among the active tenants.
    pub fn activate(&mut self, tenant: Option<&Arc<str>>, elsewhere: f64) {
        let t = self.name(tenant);
        let floor = self
            .tenants
            .iter()
            .filter(|(n, x)| x.active > 0 && **n != t)
            .map(|(_, x)| x.counter + x.elsewhere)
            .min_by(f64::total_cmp);
        let e = self.tenants.entry(t).or_default();
        e.elsewhere = elsewhere.max(0.0);
        if e.active == 0 {
            if let Some(floor) = floor {
                e.counter = e.counter.max(floor - e.elsewhere);
            }
        }
        e.active += 1;
    }

    /// A request of `tenant` ended.
    pub fn deactivate(&mut self, tenant: Option<&Arc<str>>) {
        let t = self.name(tenant);
        if let Some(e) = self.tenants.get_mut(&t) {
            e.active = e.active.saturating_sub(1);
        }
    }

    /// `tokens` of `stage` were computed for `tenant`.
    pub fn charge(&mut self, tenant: Option<&Arc<str>>, stage: Stage, tokens: usize) {
        if tokens == 0 {
            return;
        }
        let t = self.name(tenant);
        let cost = match stage {
            Stage::Prefill => self.cfg.prefill_cost,
            Stage::Decode => self.cfg.decode_cost,
        } * tokens as f64
            / self.cfg.weight(&t);
        let e = self.tenants.entry(t).or_default();
        e.counter += cost;
        e.served += cost;
    }

    /// Every tenant's charged service so far (weighted), for the router's account.
    pub fn served(&self) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> =
            self.tenants.iter().filter(|(_, x)| x.served > 0.0).map(|(n, x)| (n.to_string(), x.served)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Tenants with a request not finished.
    pub fn active(&self) -> usize {
        self.tenants.values().filter(|x| x.active > 0).count()
    }
}

/// A request's shortest-job-first rank in decode tokens (smaller first), before aging:
/// prompt tokens left at `PROMPT_PER_DECODE` a token, plus predicted output tokens left
/// (none predicted: none counted, so a prefill-only worker ranks by prompt alone).
pub fn sjf_rank(prompt_left: usize, predicted_output: Option<u32>, max_tokens: usize, generated: usize) -> f64 {
    let out = predicted_output.map_or(0, |p| (p as usize).min(max_tokens).saturating_sub(generated).max(1));
    prompt_left as f64 / PROMPT_PER_DECODE as f64 + out as f64
}

/// A policy key from a rank: an aged rank, or before every rank once `max_wait` passed.
pub fn sjf_key(rank: f64, waited_ms: u64, cfg: &SjfConfig, arrival: u64) -> (i64, u64) {
    if waited_ms >= cfg.max_wait_ms {
        return (i64::MIN, arrival);
    }
    let aged = rank - cfg.aging * waited_ms as f64 / 1000.0;
    ((aged * 1000.0) as i64, arrival)
}
