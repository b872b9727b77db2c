//! Per-request disaggregation: whether a request whose decode worker can prefill (role
//! `both`) is prefilled there, locally, or on a prefill worker that ships the KV.
//!
//! Disaggregation pays on long prompts (a long prefill in the decode batch stalls every
//! running stream's next token) and costs on short ones (a transfer, a second queue, a
//! second worker's capacity). [`decide`] is the rule for one request, a pure function of
//! what the router knows then ([`Inputs`]); [`PlacementControl`] holds its one moving
//! part, the *local budget*: the longest uncached prompt a decode worker prefills itself.
//! Finished requests' TTFT and TPOT move it against the SLOs (`--slo-ttft-ms`,
//! `--slo-tpot-ms`): it grows while decodes have TPOT headroom and remote prefills wait
//! long, and shrinks as TPOT nears its SLO. `--prefill-placement threshold` freezes it at
//! `--local-prefill-threshold` (the fixed baseline); `remote` never prefills locally.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics;

/// How the router places prefills when a decode worker could prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The budget moves with observed TTFT and TPOT (the default).
    Adaptive,
    /// A fixed budget: `--local-prefill-threshold`.
    Threshold,
    /// Always a prefill worker, when one serves the model.
    Remote,
}

impl Mode {
    pub const NAMES: [&'static str; 3] = ["adaptive", "threshold", "remote"];

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "adaptive" => Some(Mode::Adaptive),
            "threshold" => Some(Mode::Threshold),
            "remote" => Some(Mode::Remote),
            _ => None,
        }
    }
}

/// The service level a deployment aims at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slo {
    pub ttft: Duration,
    pub tpot: Duration,
}

impl Default for Slo {
    fn default() -> Self {
        Slo { ttft: Duration::from_millis(1000), tpot: Duration::from_millis(100) }
    }
}

/// How placement is configured.
#[derive(Debug, Clone, Copy)]
pub struct PlacementConfig {
    pub mode: Mode,
    /// The fixed budget of `Threshold`, and where `Adaptive` starts.
    pub threshold: usize,
    pub slo: Slo,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig { mode: Mode::Adaptive, threshold: 256, slo: Slo::default() }
    }
}

/// Where a request is prefilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On a prefill worker, its KV shipped to the decode worker.
    Remote,
    /// On the decode worker itself.
    Local,
}

impl Placement {
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Remote => "remote",
            Placement::Local => "local",
        }
    }
}

/// What one decision sees.
#[derive(Debug, Clone, Copy)]
pub struct Inputs {
    /// Prompt tokens the decode worker would compute (its prefix cache holds the rest).
    pub local_uncached: usize,
    /// Prompt tokens the chosen prefill worker would compute.
    pub remote_uncached: usize,
    /// Tokens queued on the chosen prefill worker.
    pub prefill_queue: f64,
    /// Prompt tokens a second a worker computes, measured (`None`: nothing measured yet).
    pub prefill_rate: Option<f64>,
    /// Recent TPOT, p90 over finished requests (`None`: none finished lately).
    pub tpot: Option<Duration>,
    /// Requests decoding on the decode worker (its last report, or what this router has in
    /// flight there if more): 0, and a local prefill stalls nobody's tokens.
    pub decode_running: u64,
    /// The longest uncached prompt prefilled locally now.
    pub budget: usize,
    /// The longest local prefill the running decodes' TPOT headroom absorbs: the stall it
    /// causes (its tokens at the prefill rate) spread over a typical output must stay within
    /// the SLO's headroom over recent TPOT. `None`: not measured yet.
    pub stall_cap: Option<f64>,
    pub mode: Mode,
    pub slo: Slo,
}

/// TPOT at or above this share of its SLO: nothing more is prefilled locally. Below it, a
/// local prefill must also fit the headroom (`Inputs::stall_cap`).
const TPOT_GUARD: f64 = 0.9;
/// A remote prefill predicted to queue at least this share of the TTFT SLO is worth doing
/// locally, when decodes have TPOT headroom (below `HEADROOM`) and it would be sooner.
const SLOW_REMOTE: f64 = 0.5;
const HEADROOM: f64 = 0.6;

/// `d` as a share of `of` (exact for whole milliseconds: 90 ms of 100 is 0.9).
pub fn share(d: Duration, of: Duration) -> f64 {
    d.as_nanos() as f64 / of.as_nanos().max(1) as f64
}

/// Where one request is prefilled, and why (the `reason` label).
pub fn decide(i: &Inputs) -> (Placement, &'static str) {
    let tpot_share = i.tpot.map_or(0.0, |t| share(t, i.slo.tpot));
    match i.mode {
        Mode::Remote => return (Placement::Remote, "configured"),
        Mode::Threshold if i.local_uncached <= i.budget => return (Placement::Local, "short"),
        Mode::Threshold => return (Placement::Remote, "long"),
        Mode::Adaptive => {}
    }
    if i.local_uncached == 0 {
        return (Placement::Local, "cached");
    }
    // The TPOT guard protects streams decoding there: with none, a short local prefill stalls
    // nobody. The stall cap holds even then: streams that arrive during a long prefill wait.
    let stalls = i.decode_running > 0;
    if stalls && tpot_share >= TPOT_GUARD {
        return (Placement::Remote, "tpot_slo");
    }
    if i.stall_cap.is_some_and(|cap| i.local_uncached as f64 > cap) {
        return (Placement::Remote, "tpot_headroom");
    }
    if i.local_uncached <= i.budget {
        return (Placement::Local, "short");
    }
    if let Some(rate) = i.prefill_rate.filter(|r| *r > 0.0) {
        // The prefill queue's wait, then the compute: the same rate on either worker.
        let wait = i.prefill_queue / rate;
        let (remote, local) = (wait + i.remote_uncached as f64 / rate, i.local_uncached as f64 / rate);
        let headroom = !stalls || tpot_share < HEADROOM;
        if headroom && wait >= SLOW_REMOTE * i.slo.ttft.as_secs_f64() && local < remote {
            return (Placement::Local, "prefill_queue");
        }
    }
    (Placement::Remote, "long")
}

/// The smallest and largest budgets `Adaptive` moves between.
const MIN_BUDGET: usize = 16;
const MAX_BUDGET: usize = 8192;
/// How often the budget may move.
const ADJUST_EVERY: Duration = Duration::from_millis(500);
/// Finished requests remembered for the percentiles, and for how long.
const WINDOW: usize = 64;
const WINDOW_AGE: Duration = Duration::from_secs(10);
/// Routed prompts remembered for the planner.
const PROMPT_WINDOW: usize = 256;

/// One finished request as the controller remembers it.
#[derive(Debug, Clone, Copy)]
struct Finished {
    at: Instant,
    ttft: Duration,
    /// `None`: one token, no inter-token time.
    tpot: Option<Duration>,
    /// Tokens it generated.
    tokens: u32,
}

#[derive(Debug)]
struct State {
    budget: usize,
    adjusted: Instant,
    finished: VecDeque<Finished>,
    /// Prompt tokens a second a prefill computes: an exponential average of prefills'
    /// own compute times.
    prefill_rate: Option<f64>,
    /// Tokens queued on the last remote pick, as a wait: moves the budget up.
    remote_wait: Duration,
    /// Recent routed prompts: when, and the tokens their worker had to compute.
    prompts: VecDeque<(Instant, usize)>,
}

/// The budget and what moves it (shared by every choice of the router).
#[derive(Debug)]
pub struct PlacementControl {
    pub config: PlacementConfig,
    state: Mutex<State>,
}

/// A window's view: TTFT and TPOT p90, and the median output.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recent {
    pub ttft_p90: Option<Duration>,
    pub tpot_p90: Option<Duration>,
    /// Tokens a finished request generated, the median.
    pub output_p50: Option<u32>,
    pub requests: usize,
}

/// `Inputs::stall_cap`: the prefill rate × the TPOT headroom × the median output.
fn stall_cap(rate: Option<f64>, r: &Recent, slo_tpot: Duration) -> Option<f64> {
    let headroom = slo_tpot.saturating_sub(r.tpot_p90?).as_secs_f64();
    Some(rate? * headroom * r.output_p50? as f64)
}

impl PlacementControl {
    pub fn new(config: PlacementConfig) -> PlacementControl {
        let budget = config.threshold.clamp(0, MAX_BUDGET);
        metrics::local_prefill_budget(if config.mode == Mode::Remote { 0 } else { budget });
        PlacementControl {
            config,
            state: Mutex::new(State {
                budget,
                adjusted: Instant::now(),
                finished: VecDeque::new(),
                prefill_rate: None,
                remote_wait: Duration::ZERO,
                prompts: VecDeque::new(),
            }),
        }
    }

    /// Where a request is prefilled, `local_uncached`/`remote_uncached` being what the
    /// decode worker / the prefill worker would compute, `prefill_queue` the tokens queued on
    /// that prefill worker and `decode_running` the requests decoding on the decode worker.
    /// Counted and logged.
    pub fn place(
        &self,
        local_uncached: usize,
        remote_uncached: usize,
        prefill_queue: f64,
        decode_running: u64,
    ) -> Placement {
        self.place_at(local_uncached, remote_uncached, prefill_queue, decode_running, Instant::now())
    }

    /// `place` at `now` (a simulator's clock).
    pub fn place_at(
        &self,
        local_uncached: usize,
        remote_uncached: usize,
        prefill_queue: f64,
        decode_running: u64,
        now: Instant,
    ) -> Placement {
        let (inputs, recent) = {
            let mut st = self.state.lock().expect("placement");
            self.adjust(&mut st, now);
            let recent = recent(&st.finished, now);
            let inputs = Inputs {
                local_uncached,
                remote_uncached,
                prefill_queue,
                prefill_rate: st.prefill_rate,
                decode_running,
                tpot: recent.tpot_p90,
                budget: st.budget,
                stall_cap: stall_cap(st.prefill_rate, &recent, self.config.slo.tpot),
                mode: self.config.mode,
                slo: self.config.slo,
            };
            if let Some(rate) = st.prefill_rate.filter(|r| *r > 0.0) {
                st.remote_wait = Duration::from_secs_f64((prefill_queue / rate).min(3600.0));
            }
            (inputs, recent)
        };
        let (placement, reason) = decide(&inputs);
        metrics::prefill_placement(placement.as_str(), reason);
        tracing::debug!(
            placement = placement.as_str(),
            reason,
            local_uncached,
            remote_uncached,
            prefill_queue,
            budget = inputs.budget,
            tpot_p90_ms = recent.tpot_p90.map(|t| t.as_millis() as u64),
            "prefill placement"
        );
        placement
    }

    /// A prefill worker computed `tokens` in `compute`: the measured rate moves.
    pub fn observe_prefill(&self, tokens: usize, compute: Duration) {
        if tokens < 16 || compute.is_zero() {
            return;
        }
        let rate = tokens as f64 / compute.as_secs_f64();
        let mut st = self.state.lock().expect("placement");
        st.prefill_rate = Some(match st.prefill_rate {
            Some(r) => 0.8 * r + 0.2 * rate,
            None => rate,
        });
    }

    /// A choice finished: its TTFT, mean TPOT (`None`: one token) and tokens generated.
    pub fn observe_finished(&self, ttft: Duration, tpot: Option<Duration>, tokens: u32) {
        self.observe_finished_at(ttft, tpot, tokens, Instant::now())
    }

    /// `observe_finished` at `now`.
    pub fn observe_finished_at(&self, ttft: Duration, tpot: Option<Duration>, tokens: u32, now: Instant) {
        let mut st = self.state.lock().expect("placement");
        st.finished.push_back(Finished { at: now, ttft, tpot, tokens });
        while st.finished.len() > WINDOW {
            st.finished.pop_front();
        }
    }

    /// A request was routed; its worker computes `uncached` prompt tokens (what the
    /// planner weighs the split by).
    pub fn observe_prompt(&self, uncached: usize) {
        self.observe_prompt_at(uncached, Instant::now())
    }

    /// `observe_prompt` at `now`.
    pub fn observe_prompt_at(&self, uncached: usize, now: Instant) {
        let mut st = self.state.lock().expect("placement");
        st.prompts.push_back((now, uncached));
        while st.prompts.len() > PROMPT_WINDOW
            || st.prompts.front().is_some_and(|p| now.duration_since(p.0) >= WINDOW_AGE)
        {
            st.prompts.pop_front();
        }
    }

    /// Of the prompts routed within `WINDOW_AGE`: how many, and the share longer than
    /// `tokens` uncached.
    pub fn prompts_longer_than(&self, tokens: usize) -> (usize, f64) {
        let now = Instant::now();
        let st = self.state.lock().expect("placement");
        let live: Vec<usize> =
            st.prompts.iter().filter(|p| now.duration_since(p.0) < WINDOW_AGE).map(|p| p.1).collect();
        let long = live.iter().filter(|&&n| n > tokens).count();
        (live.len(), if live.is_empty() { 0.0 } else { long as f64 / live.len() as f64 })
    }

    /// The budget now.
    pub fn budget(&self) -> usize {
        self.state.lock().expect("placement").budget
    }

    /// Prompt tokens a second a prefill computes, as measured.
    pub fn prefill_rate(&self) -> Option<f64> {
        self.state.lock().expect("placement").prefill_rate
    }

    /// TTFT and TPOT p90 over the recent window.
    pub fn recent(&self) -> Recent {
        let st = self.state.lock().expect("placement");
        recent(&st.finished, Instant::now())
    }

    /// Moves the budget (at most every `ADJUST_EVERY`, `Adaptive` only): down while TPOT
    /// nears its SLO, up while TPOT has headroom and TTFT (or the prefill queue) does not.
    fn adjust(&self, st: &mut State, now: Instant) {
        if self.config.mode != Mode::Adaptive || now.duration_since(st.adjusted) < ADJUST_EVERY {
            return;
        }
        st.adjusted = now;
        let r = recent(&st.finished, now);
        let slo = self.config.slo;
        let tpot = r.tpot_p90.map(|t| share(t, slo.tpot));
        let ttft = r.ttft_p90.map_or(0.0, |t| share(t, slo.ttft));
        let wait = share(st.remote_wait, slo.ttft);
        let before = st.budget;
        st.budget = match tpot {
            Some(t) if t >= TPOT_GUARD => (before * 7 / 10).max(MIN_BUDGET),
            Some(t) if t < 0.7 && (ttft >= SLOW_REMOTE || wait >= 0.25) => (before * 13 / 10 + 16).min(MAX_BUDGET),
            _ => before,
        };
        if st.budget != before {
            tracing::info!(
                from = before,
                to = st.budget,
                tpot_p90_ms = r.tpot_p90.map(|t| t.as_millis() as u64),
                ttft_p90_ms = r.ttft_p90.map(|t| t.as_millis() as u64),
                remote_wait_ms = st.remote_wait.as_millis() as u64,
                "local prefill budget moved"
            );
            metrics::local_prefill_budget(st.budget);
        }
    }
}

/// p90s of the finished requests younger than `WINDOW_AGE`.
fn recent(finished: &VecDeque<Finished>, now: Instant) -> Recent {
    let live: Vec<&Finished> = finished.iter().filter(|f| now.duration_since(f.at) < WINDOW_AGE).collect();
    let p90 = |mut v: Vec<Duration>| {
        v.sort();
        (!v.is_empty()).then(|| v[(v.len() * 9 / 10).min(v.len() - 1)])
    };
    let mut tokens: Vec<u32> = live.iter().map(|f| f.tokens).collect();
    tokens.sort();
    Recent {
        ttft_p90: p90(live.iter().map(|f| f.ttft).collect()),
        tpot_p90: p90(live.iter().filter_map(|f| f.tpot).collect()),
        output_p50: tokens.get(tokens.len() / 2).copied(),
        requests: live.len(),
    }
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
