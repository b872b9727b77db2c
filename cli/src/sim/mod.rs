//! `tandem sim`: a cluster simulated on cost models (`tandem profile`), driven by the
//! workloads of `bench serve` or a Mooncake-format trace, reporting what `bench serve`
//! reports; `--search` finds the prefill/decode split (and decode batch limit) with the most
//! goodput per worker, as DistServe's placement search does.

pub mod cost;
mod search;
mod worker;
pub mod world;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tandem_engine::scheduler::{Policy, SchedulerConfig};
use tandem_router::placement::{Mode, PlacementConfig, Slo as PlacementSlo};

use crate::bench_serve::client::Sample;
use crate::bench_serve::report::{Run, Slo};
use crate::bench_serve::{workload, WorkloadArgs};
use cost::Costs;
use world::{Arrival, Config, World};

#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// The cost model: a `tandem profile` JSON, or one written by hand.
    #[arg(long)]
    pub costs: PathBuf,
    /// Every step this many times faster than the cost model says (a faster machine).
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// KV blocks per worker, overriding the cost model's.
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// The link KV crosses: a name in the cost model (`shm`, `tcp`, ...).
    #[arg(long, default_value = "tcp")]
    pub link: String,
    /// Prefill workers.
    #[arg(long, default_value_t = 1)]
    pub prefill: usize,
    /// Decode workers.
    #[arg(long, default_value_t = 1)]
    pub decode: usize,
    /// Workers of role `both`.
    #[arg(long, default_value_t = 0)]
    pub both: usize,
    /// The router's routing policy: cache-aware, least-loaded or round-robin.
    #[arg(long, default_value = "cache-aware")]
    pub routing_policy: String,
    #[arg(long, default_value_t = 2.0)]
    pub cache_weight: f64,
    /// Per-request placement on role-`both` decode workers: adaptive, threshold or remote.
    #[arg(long, default_value = "adaptive")]
    pub prefill_placement: String,
    #[arg(long, default_value_t = 256)]
    pub local_prefill_threshold: usize,
    /// The workers' scheduling policy: fcfs, priority, fair or sjf.
    #[arg(long, default_value = "fcfs")]
    pub scheduling_policy: String,
    /// Tokens per engine step at most (every worker).
    #[arg(long, default_value_t = 512)]
    pub max_batched_tokens: usize,
    /// Sequences a decode (or `both`) worker runs at once at most.
    #[arg(long, default_value_t = 64)]
    pub max_seqs: usize,
    /// Requests a worker queues at most.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// Longest sequence (prompt + output) a worker takes.
    #[arg(long, default_value_t = 8192)]
    pub max_model_len: usize,
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Seconds a request waits for KV room when every decode pool is full.
    #[arg(long, default_value_t = 30.0)]
    pub kv_wait: f64,
    /// The router's in-flight limit.
    #[arg(long, default_value_t = 512)]
    pub max_inflight: usize,
    /// Refuse requests predicted to miss the TTFT SLO (`--slo-admission all` on the router).
    #[arg(long)]
    pub slo_admission: bool,
    /// Open loop: requests per second, Poisson (as `bench serve --rate`); a list sweeps.
    /// Without it a trace is replayed at its own timestamps.
    #[arg(long, value_delimiter = ',', conflicts_with = "concurrency")]
    pub rate: Vec<f64>,
    /// Closed loop: requests out at once, the next sent as one ends (`bench serve
    /// --concurrency`).
    #[arg(long)]
    pub concurrency: Option<usize>,
    #[command(flatten)]
    pub w: WorkloadArgs,
    /// The model whose tokenizer and chat template turn text workloads into token ids (a
    /// trace's or `random:` prompts need none).
    #[arg(long, env = "TANDEM_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// TTFT objective in ms (goodput counts requests that meet every objective given).
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// Requests still out after this many simulated seconds count as failed.
    #[arg(long)]
    pub horizon: Option<f64>,
    /// The workers share this many cores (worker i on core i mod N, prefill workers first,
    /// then decode, then both), as on one small machine; default: each its own.
    #[arg(long)]
    pub cores: Option<usize>,
    /// Print one JSON object per run.
    #[arg(long)]
    pub json: bool,
    /// Also print where each request went (JSON lines: request, prefill, decode).
    #[arg(long)]
    pub routes: bool,
    /// Latency CDFs as `bench serve --plot` draws them; with --search, the search's chart.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub search: search::SearchArgs,
}

/// Prompts (token ids) with their output lengths.
type Prompts = Vec<(Vec<u32>, u32)>;

/// The token ids of `random:IN:OUT` (a sim-only workload: `n` prompts of IN random tokens,
/// OUT output tokens each), or `None` for another workload.
fn random_workload(name: &str, n: usize, seed: u64) -> Result<Option<Prompts>> {
    let Some(rest) = name.strip_prefix("random:") else { return Ok(None) };
    let (i, o) = rest.split_once(':').context("random:IN:OUT")?;
    let (i, o): (usize, u32) = (i.parse().context("random:IN:OUT")?, o.parse().context("random:IN:OUT")?);
    if i == 0 || o == 0 {
        bail!("random:IN:OUT: both positive");
    }
    let mut rng = crate::bench_serve::text::Rng::new(seed ^ 0x51a);
    Ok(Some((0..n).map(|_| ((0..i).map(|_| 200 + rng.below(30_000) as u32).collect(), o)).collect()))
}

/// The requests of the run at `rate` (`None`: the trace's own timestamps), as arrivals.
pub fn arrivals(a: &SimArgs, rate: Option<f64>, k: u64) -> Result<Vec<Arrival>> {
    let seed = a.w.seed + k;
    let n = a.w.requests.unwrap_or(workload::DEFAULT_REQUESTS);
    if let Some(reqs) = random_workload(&a.w.workload, n, seed)? {
        let at = match rate {
            Some(r) => workload::arrivals(reqs.len(), r, seed),
            None if a.concurrency.is_some() => vec![0.0; reqs.len()],
            None => bail!("random:IN:OUT needs --rate or --concurrency"),
        };
        return Ok(reqs
            .into_iter()
            .zip(at)
            .map(|((prompt, out), at)| Arrival {
                at,
                prompt,
                output_len: a.w.max_tokens.unwrap_or(out),
                tenant: None,
                phase: None,
            })
            .collect());
    }
    let spec = a.w.spec(rate.is_none() && a.concurrency.is_none(), true);
    let w = workload::build(&spec, a.w.requests, seed)?;
    let times = match (rate, &w.times) {
        (Some(r), _) => workload::arrivals(w.items.len(), r, seed),
        (None, Some(t)) => t.clone(),
        (None, None) if a.concurrency.is_some() => vec![0.0; w.items.len()],
        (None, None) => bail!("--workload {}: give --rate or --concurrency", a.w.workload),
    };
    let needs_text = w.items.iter().any(|i| i.tokens.is_none());
    let text =
        if needs_text {
            Some(tandem_text::model_text::ModelText::open(&a.model).with_context(|| {
                format!("{} (its tokenizer turns the workload's text into tokens)", a.model.display())
            })?)
        } else {
            None
        };
    let mut out = Vec::with_capacity(w.items.len());
    for (item, at) in w.items.into_iter().zip(times) {
        let prompt = match (item.tokens, &text) {
            (Some(t), _) => t,
            (None, Some(t)) => {
                let template = t.chat_template.as_ref().context("the model has no chat template")?;
                let msgs: Vec<tandem_text::chat::ChatMessage> = item
                    .messages
                    .iter()
                    .map(|(r, c)| tandem_text::chat::ChatMessage::new(r.as_str(), c.as_str()))
                    .collect();
                tandem_text::prompt::chat_ids(&t.tokenizer, template, &msgs, true)?.0
            }
            (None, None) => unreachable!("text is loaded when an item needs it"),
        };
        out.push(Arrival { at, prompt, output_len: item.output_len, tenant: None, phase: item.phase });
    }
    Ok(out)
}

impl SimArgs {
    pub fn costs(&self) -> Result<Costs> {
        let mut c = Costs::load(&self.costs)?;
        if !(self.speedup.is_finite() && self.speedup > 0.0) {
            bail!("--speedup must be positive");
        }
        c.step = c.step.faster(self.speedup);
        if let Some(b) = self.kv_blocks {
            if b == 0 {
                bail!("--kv-blocks must be positive");
            }
            c.kv_blocks = b;
        }
        Ok(c)
    }

    /// The cluster these flags describe, with `prefill`/`decode`/`both` workers.
    pub fn config(&self, costs: &Costs) -> Result<Config> {
        let mode = Mode::parse(&self.prefill_placement)
            .with_context(|| format!("--prefill-placement {:?}: one of {:?}", self.prefill_placement, Mode::NAMES))?;
        let policy = Policy::parse(&self.scheduling_policy)
            .with_context(|| format!("--scheduling-policy {:?} is not a policy", self.scheduling_policy))?;
        let slo = PlacementSlo {
            ttft: Duration::from_secs_f64(self.slo_ttft_ms.unwrap_or(1000.0) / 1e3),
            tpot: Duration::from_secs_f64(self.slo_tpot_ms.unwrap_or(100.0) / 1e3),
        };
        if self.max_batched_tokens == 0 || self.max_seqs == 0 {
            bail!("--max-batched-tokens and --max-seqs must be positive");
        }
        let sched = SchedulerConfig {
            max_batched_tokens: self.max_batched_tokens,
            max_waiting: self.max_waiting,
            max_prompt_len: self.max_model_len - 1,
            max_model_len: self.max_model_len,
            policy,
            ..SchedulerConfig::default()
        };
        Ok(Config {
            prefill: self.prefill,
            decode: self.decode,
            both: self.both,
            policy: self.routing_policy.clone(),
            cache_weight: self.cache_weight,
            placement: PlacementConfig { mode, threshold: self.local_prefill_threshold, slo },
            prefill_sched: sched.clone(),
            decode_sched: SchedulerConfig { max_seqs: self.max_seqs, ..sched },
            prefix_caching: !self.no_prefix_cache,
            link: costs.link(&self.link)?,
            kv_wait: Duration::from_secs_f64(self.kv_wait.max(0.0)),
            max_inflight: self.max_inflight,
            slo_admission_ttft: self.slo_admission.then_some(slo.ttft),
            horizon: self.horizon,
            cores: self.cores,
            concurrency: self.concurrency,
        })
    }

    pub fn slo(&self) -> Slo {
        Slo { ttft_ms: self.slo_ttft_ms, tpot_ms: self.slo_tpot_ms }
    }
}

/// A simulated run in `bench serve`'s terms.
pub fn to_run(report: &world::Report, label: String, rate: Option<f64>) -> Run {
    let samples = report
        .outcomes
        .iter()
        .map(|o| {
            let first = o.first.unwrap_or(o.sent);
            let end = o.end.unwrap_or(first);
            Sample {
                ok: o.ok,
                error: o.error.clone(),
                ttft: Duration::from_secs_f64((first - o.sent).max(0.0)),
                e2e: Duration::from_secs_f64((end - o.sent).max(0.0)),
                output_tokens: o.output_tokens,
                prompt_tokens: o.prompt_tokens,
                cached_tokens: o.cached_tokens,
                itl: o.itl.clone(),
                phase: o.phase,
                span: o.end.map(|e| (o.sent, e)),
                refused: o.refused,
                tenant: o.tenant.as_deref().map(str::to_string),
            }
        })
        .collect();
    Run { label, rate, samples, wall_s: report.span_s.max(1e-9), ideal_hit_rate: None }
}

/// One simulation of `a`'s cluster at `rate`.
pub fn simulate(a: &SimArgs, costs: &Costs, cfg: Config, rate: Option<f64>, k: u64) -> Result<world::Report> {
    let arrivals = arrivals(a, rate, k)?;
    Ok(World::new(cfg, costs.clone())?.run(arrivals))
}

pub fn run(a: SimArgs) -> Result<()> {
    let costs = a.costs()?;
    if a.search.search {
        return search::run(&a, &costs);
    }
    let cfg = a.config(&costs)?;
    let slo = a.slo();
    let rates: Vec<Option<f64>> =
        if a.rate.is_empty() { vec![None] } else { a.rate.iter().map(|r| Some(*r)).collect() };
    if let Some(r) = a.rate.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        bail!("--rate {r}: rates must be positive");
    }
    let mut runs = Vec::new();
    for (k, rate) in rates.into_iter().enumerate() {
        let arrivals = arrivals(&a, rate, k as u64)?;
        let ideal = ideal_hit_rate(&arrivals, costs.block_size);
        let started = Instant::now();
        let report = World::new(cfg.clone(), costs.clone())?.run(arrivals);
        let took = started.elapsed().as_secs_f64();
        let label = match (rate, a.concurrency) {
            (Some(r), _) => format!("rate={r}"),
            (None, Some(c)) => format!("concurrency={c}"),
            (None, None) => format!("trace x{}", a.w.trace_time_scale),
        };
        let mut run = to_run(&report, label, rate);
        run.ideal_hit_rate = Some(ideal);
        let mut v = run.json(&slo);
        v["simulated"] = serde_json::json!({
            "prefill": a.prefill, "decode": a.decode, "both": a.both,
            "costs": costs.source, "link": a.link, "speedup": a.speedup,
            "events": report.events, "steps": report.steps,
            "held_blocks_at_end": report.held_blocks, "left_in_engines": report.left_in_engines,
            "simulated_s": report.span_s, "real_s": took,
            "workers": report.workers.iter().map(|(id, steps, busy)| serde_json::json!({
                "id": id, "steps": steps, "busy_share": busy / report.span_s.max(1e-9)})).collect::<Vec<_>>(),
        });
        v["workload"] = a.w.workload.clone().into();
        if a.routes {
            for (i, o) in report.outcomes.iter().enumerate() {
                println!("{}", serde_json::json!({"request": i, "prefill": o.prefill_on, "decode": o.decode_on}));
            }
        }
        if a.json {
            println!("{v}");
        } else {
            run.print(&v);
            println!(
                "simulated {:.1} s of {}P{}D{}B in {took:.2} s ({} events, {} steps)",
                report.span_s, a.prefill, a.decode, a.both, report.events, report.steps
            );
        }
        runs.push(run);
    }
    if let Some(p) = &a.plot {
        crate::bench_serve::plot::plot(p, &runs, &slo)?;
    }
    Ok(())
}

/// The share of prompt tokens one infinite cache seeing every request would serve (blocks
/// of `block` tokens; never a prompt's last token).
fn ideal_hit_rate(arrivals: &[Arrival], block: usize) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let (mut hit, mut total) = (0usize, 0usize);
    for a in arrivals {
        total += a.prompt.len();
        let usable = &a.prompt[..a.prompt.len().saturating_sub(1)];
        let hashes = tandem_text::prefix::prefix_hashes(usable, block, None);
        let mut leading = true;
        for h in hashes {
            if leading && seen.contains(&h.0) {
                hit += block;
            } else {
                leading = false;
            }
            seen.insert(h.0);
        }
    }
    hit as f64 / total.max(1) as f64
}
