//! `tandem bench serve`: a load generator for serving systems.
//!
//! Open loop (`--rate R`: Poisson arrivals; a comma-separated list sweeps rates) or
//! closed loop (`--concurrency C`: each client sends its next request when the last
//! ends), bounded by `--requests` and `--timeout`. Speaks Tandem's gRPC API or any
//! OpenAI-compatible HTTP server, so the same seeded trace drives Tandem and, e.g.,
//! llama.cpp's `llama-server`. Reports TTFT, TPOT, ITL and end-to-end latency
//! (mean, p50, p90, p99), throughput, and SLO attainment and goodput (requests per
//! second that meet both the TTFT and the TPOT objective, DistServe's measure), the
//! rejection rate, and the prefix hit rate (prompt tokens the server served from its cache).
//! Workloads with shared prefixes (`shared-prefix`, `shared-contexts`) and replays of
//! Mooncake-format traces (`trace:FILE`, with the trace's ideal hit rate) measure how well a
//! cluster's routing keeps requests next to their cached prefixes. A phased workload
//! (`phased`, or a JSONL file whose lines carry `phase`) shifts its load partway, and its
//! report gives every figure per phase as well: how a cluster's split of prefill and decode
//! follows the shift.

pub mod client;
pub mod mooncake;
pub mod plot;
pub mod report;
pub mod text;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;

use client::Client;
use report::{Run, Slo};

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    /// The server: `host:port` or `http://host:port` (Tandem's gRPC or any OpenAI-compatible HTTP API).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub target: String,
    /// `grpc` (Tandem's tandem.v1 API) or `openai` (`/v1/chat/completions`, streaming).
    #[arg(long, default_value = "grpc")]
    pub api: String,
    /// Open loop: requests per second, Poisson arrivals. A comma-separated list sweeps rates.
    #[arg(long, value_delimiter = ',', conflicts_with = "concurrency")]
    pub rate: Vec<f64>,
    /// Closed loop: requests in flight at once (the default, 8, when no --rate is given).
    #[arg(long)]
    pub concurrency: Option<usize>,
    #[command(flatten)]
    pub w: WorkloadArgs,
    /// Print what the workload would send (requests, prompt and output tokens, a trace's ideal
    /// hit rate and span) as one JSON line, and send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// TTFT objective in ms (a request meets the SLO when it meets every objective given).
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// TPOT objective in ms.
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// Give up on a run after this many seconds (requests still out count as failed).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Model name for the OpenAI API (default: the server's first listed model).
    #[arg(long)]
    pub model: Option<String>,
    /// API key sent as a bearer token (gRPC `authorization` metadata or HTTP header).
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print one JSON object per run (JSON lines).
    #[arg(long)]
    pub json: bool,
    /// Write latency CDFs (and attainment against rate, for a sweep) to this PNG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// A tenant of a multi-tenant run: `NAME=KEY@RATE` (KEY its API key, empty for none;
    /// RATE its requests per second, Poisson). Repeat for each tenant; each sends the
    /// workload (its own seed) for --duration seconds, and the report gives every figure per
    /// tenant, with the largest service gap while all were backlogged (`tenants`).
    #[arg(long = "tenant", value_parser = tenant_spec)]
    pub tenants: Vec<TenantSpec>,
    /// Multi-tenant runs: how long each tenant sends, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Send every request with this TTFT objective (`slo_ttft_ms`; HTTP `x-slo-ttft-ms`), so
    /// the router refuses those it predicts to miss it.
    #[arg(long)]
    pub request_slo_ttft_ms: Option<u32>,
    /// Write every request's output tokens, one per line in workload order (the first run's).
    #[arg(long)]
    pub lengths_out: Option<PathBuf>,
    /// Send each request's expected output length from this file (one per line in workload
    /// order, as --lengths-out writes it; `expected_output_tokens`): with the lengths a
    /// greedy run produced, the `sjf` ceiling of an oracle predictor.
    #[arg(long)]
    pub expected_lengths: Option<PathBuf>,
}

/// The requests a run sends (shared with `tandem sim`, which simulates the same ones).
#[derive(Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// Requests per run (default 64; a trace: every request it keeps, at most this many; a JSONL
    /// file: every line once, or this many, its lines reused in order).
    #[arg(long)]
    pub requests: Option<usize>,
    /// `chat` (short prompts, 64–192 output tokens), `summarize` (~940-token prompts, 32 out),
    /// `shared-prefix` (a ~600-token shared system prompt, 32 out), `shared-contexts` (--groups
    /// long contexts, each shared by --users users' short queries, 32 out), `phased` (the first
    /// half summarize's long prompts and short outputs, phase 0; the second half short prompts
    /// with 128–256 output tokens, phase 1; figures reported per phase too), `trace:FILE` (a
    /// Mooncake-format trace replayed, see --trace-*), or a JSONL file, one request a line:
    /// `{"prompt": TEXT}` or `{"messages": [{"role", "content"}, ..]}`, with `"output_len": N`
    /// (default 64) and optionally `"phase": N` (figures reported per phase, as for `phased`).
    #[arg(long, default_value = "chat")]
    pub workload: String,
    /// shared-contexts: groups, each with its own long context.
    #[arg(long, default_value_t = 8)]
    pub groups: usize,
    /// shared-contexts: users per group, each sending short queries about the group's context.
    #[arg(long, default_value_t = 4)]
    pub users: usize,
    /// shared-contexts: tokens per context (approximate: the server tokenizes).
    #[arg(long, default_value_t = 1000)]
    pub context_tokens: usize,
    /// shared-contexts: tokens per query (approximate).
    #[arg(long, default_value_t = 20)]
    pub query_tokens: usize,
    /// trace: tokens each 512-token hash block of the trace becomes (input lengths scale by this / 512).
    #[arg(long, default_value_t = mooncake::TRACE_BLOCK_TOKENS)]
    pub trace_block_tokens: usize,
    /// trace: multiplies the trace's timestamps. Requests are sent at them unless --rate
    /// (Poisson) or --concurrency (closed loop) is given.
    #[arg(long, default_value_t = 1.0)]
    pub trace_time_scale: f64,
    /// trace: keep the first this many requests (after --trace-sample).
    #[arg(long)]
    pub trace_max_requests: Option<usize>,
    /// trace: multiplies output lengths (at least 1 token; --max-tokens overrides).
    #[arg(long, default_value_t = 1.0)]
    pub trace_output_scale: f64,
    /// trace: prompts are cut to this many tokens, blocks dropped from the end. The model's
    /// context holds 8192, but on CPU a long prompt takes seconds of prefill.
    #[arg(long, default_value_t = 1800)]
    pub trace_max_input: usize,
    /// trace: keep this seeded fraction of the conversations (requests sharing their first two
    /// hash ids), each with all its requests.
    #[arg(long, default_value_t = 1.0)]
    pub trace_sample: f64,
    /// Output tokens per request, overriding the workload's.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Seed of the trace (prompts, output lengths, arrival times).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// One `--tenant`.
#[derive(Debug, Clone)]
pub struct TenantSpec {
    pub name: String,
    pub key: Option<String>,
    pub rate: f64,
}

fn tenant_spec(s: &str) -> Result<TenantSpec, String> {
    let (name, rest) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=KEY@RATE"))?;
    let (key, rate) = rest.rsplit_once('@').ok_or_else(|| format!("{s:?} is not NAME=KEY@RATE"))?;
    let rate: f64 = rate.parse().map_err(|_| format!("{rate:?} is not a rate"))?;
    if name.is_empty() || !(rate.is_finite() && rate > 0.0) {
        return Err(format!("{s:?}: a tenant needs a name and a positive rate"));
    }
    Ok(TenantSpec { name: name.into(), key: (!key.is_empty()).then(|| key.to_string()), rate })
}

/// Sends `item` and notes when, from the run's `start`, it was sent and when it ended.
async fn send_timed(clients: &[Client], item: &workload::Item, start: tokio::time::Instant) -> client::Sample {
    let sent = start.elapsed().as_secs_f64();
    let mut s = clients[item.tenant.min(clients.len() - 1)].send(item).await;
    s.span = Some((sent, start.elapsed().as_secs_f64()));
    s
}

/// Requests sent at their arrival times (seconds from the start).
async fn open_loop(
    clients: &Arc<Vec<Client>>,
    items: &Arc<Vec<workload::Item>>,
    times: Vec<f64>,
    label: String,
    rate: Option<f64>,
    timeout: Duration,
) -> Run {
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, at) in times.into_iter().enumerate() {
        let (c, items) = (clients.clone(), items.clone());
        tasks.spawn(async move {
            tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
            (i, send_timed(&c, &items[i], start).await)
        });
    }
    collect(tasks, items, start, timeout, label, rate).await
}

/// `c` clients, each sending its next request when its last one ends.
async fn closed_loop(client: &Client, items: &Arc<Vec<workload::Item>>, c: usize, timeout: Duration) -> Run {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (cl, items, next, tx) = (Arc::new(vec![client.clone()]), items.clone(), next.clone(), tx.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= items.len() {
                    return;
                }
                let _ = tx.send((i, send_timed(&cl, &items[i], start).await));
            }
        });
    }
    drop(tx);
    let run = gather(rx, items, start, timeout, format!("concurrency={c}"), None).await;
    tasks.abort_all();
    run
}

async fn collect(
    mut tasks: tokio::task::JoinSet<(usize, client::Sample)>,
    items: &[workload::Item],
    start: tokio::time::Instant,
    timeout: Duration,
    label: String,
    rate: Option<f64>,
) -> Run {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let forward = tokio::spawn(async move {
        while let Some(Ok(r)) = tasks.join_next().await {
            if tx.send(r).is_err() {
                break;
            }
        }
        // Dropping the set aborts what is left.
    });
    let run = gather(rx, items, start, timeout, label, rate).await;
    forward.abort();
    run
}

/// Collects the samples of `items` until all arrived or the timeout passed; missing ones
/// count as failed. Each sample is labelled with its request's phase.
async fn gather(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(usize, client::Sample)>,
    items: &[workload::Item],
    start: tokio::time::Instant,
    timeout: Duration,
    label: String,
    rate: Option<f64>,
) -> Run {
    let n = items.len();
    let mut samples: Vec<Option<client::Sample>> = vec![None; n];
    let end = start + timeout;
    let mut got = 0;
    while got < n {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some((i, s))) => {
                samples[i] = Some(s);
                got += 1;
            }
            _ => break,
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    let samples = samples
        .into_iter()
        .zip(items)
        .map(|(s, item)| client::Sample {
            phase: item.phase,
            ..s.unwrap_or_else(|| client::Sample {
                error: Some("did not finish within --timeout".into()),
                ..Default::default()
            })
        })
        .collect();
    Run { label, rate, samples, wall_s, ideal_hit_rate: None }
}

impl ServeBenchArgs {
    fn spec(&self) -> workload::Spec {
        // Only Tandem's gRPC API is sure to take token ids; OpenAI servers get text.
        self.w.spec(self.rate.is_empty() && self.concurrency.is_none(), self.api == "grpc")
    }
}

impl WorkloadArgs {
    /// The workload these flags name; `timed`: a trace is sent at its own timestamps;
    /// `token_ids`: a trace's prompts are token ids rather than text.
    pub fn spec(&self, timed: bool, token_ids: bool) -> workload::Spec {
        workload::Spec {
            name: self.workload.clone(),
            output_len: self.max_tokens,
            shared: workload::SharedContexts {
                groups: self.groups,
                users: self.users,
                context_tokens: self.context_tokens,
                query_tokens: self.query_tokens,
            },
            trace: mooncake::Options {
                block_tokens: self.trace_block_tokens,
                time_scale: self.trace_time_scale,
                max_requests: self.trace_max_requests,
                output_scale: self.trace_output_scale,
                max_input: self.trace_max_input,
                sample: self.trace_sample,
                timed,
            },
            token_ids,
        }
    }
}

/// What `--dry-run` prints: the workload's size without sending it. Prompt tokens are exact
/// for token-id prompts and counted as words for text (the server's tokenizer decides). A
/// phased workload's are given per phase too, in phase order.
fn describe(w: &workload::Workload) -> serde_json::Value {
    let prompt = |i: &workload::Item| match &i.tokens {
        Some(t) => t.len(),
        None => i.messages.iter().map(|(_, c)| c.split_whitespace().count()).sum(),
    };
    let mut v = serde_json::json!({
        "requests": w.items.len(),
        "prompt_tokens": w.items.iter().map(prompt).sum::<usize>(),
        "prompt_tokens_max": w.items.iter().map(prompt).max(),
        "output_tokens": w.items.iter().map(|i| u64::from(i.output_len)).sum::<u64>(),
        "output_tokens_max": w.items.iter().map(|i| i.output_len).max(),
        "ideal_hit_rate": w.ideal_hit_rate,
        "span_s": w.times.as_ref().and_then(|t| t.last().copied()),
    });
    let mut phases: Vec<u32> = w.items.iter().filter_map(|i| i.phase).collect();
    phases.sort_unstable();
    phases.dedup();
    if !phases.is_empty() {
        let of = |p: u32| w.items.iter().filter(move |i| i.phase == Some(p));
        v["phases"] = phases
            .into_iter()
            .map(|p| {
                serde_json::json!({
                    "phase": p,
                    "requests": of(p).count(),
                    "prompt_tokens": of(p).map(prompt).sum::<usize>(),
                    "output_tokens": of(p).map(|i| u64::from(i.output_len)).sum::<u64>(),
                })
            })
            .collect();
    }
    v
}

/// Every `--tenant` sending the workload at its own rate for `--duration`, at once, each
/// with its own key: one run whose samples carry their tenant.
async fn tenants_run(a: &ServeBenchArgs, spec: &workload::Spec, timeout: Duration) -> Result<Run> {
    let (mut items, mut times, mut clients) = (Vec::new(), Vec::new(), Vec::new());
    for (k, t) in a.tenants.iter().enumerate() {
        clients.push(Client::connect(&a.target, &a.api, a.model.clone(), t.key.clone()).await?);
        let n = (t.rate * a.duration).round().max(1.0) as usize;
        let seed = a.w.seed + 1000 * (k as u64 + 1);
        let w = workload::build(spec, Some(n), seed)?;
        let at = workload::arrivals(w.items.len(), t.rate, seed);
        for (mut item, at) in w.items.into_iter().zip(at) {
            item.tenant = k;
            item.slo_ttft_ms = a.request_slo_ttft_ms;
            items.push((at, item));
        }
    }
    items.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (at, items): (Vec<f64>, Vec<workload::Item>) = items.into_iter().unzip();
    times.extend(at);
    let names: Vec<String> = a.tenants.iter().map(|t| t.name.clone()).collect();
    let label = a.tenants.iter().map(|t| format!("{}@{}", t.name, t.rate)).collect::<Vec<_>>().join(",");
    let items = Arc::new(items);
    let mut run = open_loop(&Arc::new(clients), &items, times, label, None, timeout).await;
    for (s, item) in run.samples.iter_mut().zip(items.iter()) {
        s.tenant = Some(names[item.tenant].clone());
    }
    Ok(run)
}

pub fn run(a: ServeBenchArgs) -> Result<()> {
    if a.w.requests == Some(0) || a.concurrency == Some(0) || a.w.max_tokens == Some(0) {
        bail!("--requests, --concurrency and --max-tokens must be positive");
    }
    if let Some(r) = a.rate.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        bail!("--rate {r}: rates must be positive");
    }
    // Each run of a sweep gets its own prompts (seed + k): a server's caches must not
    // turn one run's prompts into the next run's hits.
    let spec = a.spec();
    let expected: Option<Vec<u32>> = match &a.expected_lengths {
        None => None,
        Some(p) => Some(
            std::fs::read_to_string(p)?
                .lines()
                .map(|l| l.trim().parse::<u32>().map(|n| n.max(1)))
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        ),
    };
    let trace = |k: usize| {
        workload::build(&spec, a.w.requests, a.w.seed + k as u64).map(|mut w| {
            for (n, i) in w.items.iter_mut().enumerate() {
                i.slo_ttft_ms = a.request_slo_ttft_ms;
                i.expected_output = expected.as_ref().and_then(|e| e.get(n).copied());
            }
            w
        })
    };
    let first = trace(0)?;
    if a.dry_run {
        let mut v = describe(&first);
        v["workload"] = a.w.workload.clone().into();
        println!("{v}");
        return Ok(());
    }
    let slo = Slo { ttft_ms: a.slo_ttft_ms, tpot_ms: a.slo_tpot_ms };
    let timeout = Duration::from_secs(a.timeout);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let runs = rt.block_on(async {
        let client = Client::connect(&a.target, &a.api, a.model.clone(), a.api_key.clone()).await?;
        let clients = Arc::new(vec![client.clone()]);
        let mut runs = Vec::new();
        if !a.tenants.is_empty() {
            runs.push(tenants_run(&a, &spec, timeout).await?);
        } else if let Some(times) = first.times.clone() {
            let label = format!("trace x{}", a.w.trace_time_scale);
            let mut run = open_loop(&clients, &Arc::new(first.items), times, label, None, timeout).await;
            run.ideal_hit_rate = first.ideal_hit_rate;
            runs.push(run);
        } else if a.rate.is_empty() {
            let mut run = closed_loop(&client, &Arc::new(first.items), a.concurrency.unwrap_or(8), timeout).await;
            run.ideal_hit_rate = first.ideal_hit_rate;
            runs.push(run);
        } else {
            for (k, &r) in a.rate.iter().enumerate() {
                let w = if k == 0 { first.clone() } else { trace(k)? };
                let times = workload::arrivals(w.items.len(), r, a.w.seed + k as u64);
                let items = Arc::new(w.items);
                let mut run = open_loop(&clients, &items, times, format!("rate={r}"), Some(r), timeout).await;
                run.ideal_hit_rate = w.ideal_hit_rate;
                runs.push(run);
            }
        }
        Ok::<_, anyhow::Error>(runs)
    })?;
    if let (Some(path), Some(r)) = (&a.lengths_out, runs.first()) {
        let lines: Vec<String> = r.samples.iter().map(|s| s.output_tokens.to_string()).collect();
        std::fs::write(path, lines.join("\n") + "\n")?;
    }
    let started = Instant::now();
    for r in &runs {
        let mut v = r.json(&slo);
        v["target"] = a.target.clone().into();
        v["api"] = a.api.clone().into();
        v["workload"] = a.w.workload.clone().into();
        if a.json {
            println!("{v}");
        } else {
            r.print(&v);
        }
    }
    if let Some(p) = &a.plot {
        plot::plot(p, &runs, &slo)?;
        if !a.json {
            println!("plot: {} ({:.1} s)", p.display(), started.elapsed().as_secs_f64());
        }
    }
    if runs.iter().all(|r| r.samples.iter().all(|s| !s.ok)) {
        bail!("every request failed");
    }
    Ok(())
}
