//! `tandem bench serve`: a load generator for serving systems.
//!
//! Open loop (`--rate R`: Poisson arrivals; a comma-separated list sweeps rates) or
//! closed loop (`--concurrency C`: each client sends its next request when the last
//! ends), bounded by `--requests` and `--timeout`. Speaks Tandem's gRPC API or any
//! OpenAI-compatible HTTP server, so the same seeded trace drives Tandem and, e.g.,
//! llama.cpp's `llama-server`. Reports TTFT, TPOT, ITL and end-to-end latency
//! (mean, p50, p90, p99), throughput, and SLO attainment and goodput (requests per
//! second that meet both the TTFT and the TPOT objective, DistServe's measure).

mod client;
mod plot;
mod report;
mod workload;

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
    /// Requests per run.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// `chat` (short prompts, 64–192 output tokens), `summarize` (~940-token prompts, 32 out),
    /// `shared-prefix` (a ~600-token shared system prompt, 32 out), or a JSONL file of
    /// `{"prompt" | "messages", "output_len"}`.
    #[arg(long, default_value = "chat")]
    pub workload: String,
    /// Output tokens per request, overriding the workload's.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// TTFT objective in ms (a request meets the SLO when it meets every objective given).
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// TPOT objective in ms.
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// Seed of the trace (prompts, output lengths, arrival times).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
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
}

/// Requests sent at their Poisson arrival times.
async fn open_loop(client: &Client, items: &Arc<Vec<workload::Item>>, rate: f64, seed: u64, timeout: Duration) -> Run {
    let times = workload::arrivals(items.len(), rate, seed);
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, at) in times.into_iter().enumerate() {
        let (c, items) = (client.clone(), items.clone());
        tasks.spawn(async move {
            tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
            (i, c.send(&items[i]).await)
        });
    }
    collect(tasks, items.len(), start, timeout, format!("rate={rate}"), Some(rate)).await
}

/// `c` clients, each sending its next request when its last one ends.
async fn closed_loop(client: &Client, items: &Arc<Vec<workload::Item>>, c: usize, timeout: Duration) -> Run {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (cl, items, next, tx) = (client.clone(), items.clone(), next.clone(), tx.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= items.len() {
                    return;
                }
                let _ = tx.send((i, cl.send(&items[i]).await));
            }
        });
    }
    drop(tx);
    let run = gather(rx, items.len(), start, timeout, format!("concurrency={c}"), None).await;
    tasks.abort_all();
    run
}

async fn collect(
    mut tasks: tokio::task::JoinSet<(usize, client::Sample)>,
    n: usize,
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
    let run = gather(rx, n, start, timeout, label, rate).await;
    forward.abort();
    run
}

/// Collects samples until all `n` arrived or the timeout passed; missing ones count as failed.
async fn gather(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(usize, client::Sample)>,
    n: usize,
    start: tokio::time::Instant,
    timeout: Duration,
    label: String,
    rate: Option<f64>,
) -> Run {
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
        .map(|s| {
            s.unwrap_or_else(|| client::Sample {
                error: Some("did not finish within --timeout".into()),
                ..Default::default()
            })
        })
        .collect();
    Run { label, rate, samples, wall_s }
}

pub fn run(a: ServeBenchArgs) -> Result<()> {
    if a.requests == 0 || a.concurrency == Some(0) || a.max_tokens == Some(0) {
        bail!("--requests, --concurrency and --max-tokens must be positive");
    }
    if let Some(r) = a.rate.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        bail!("--rate {r}: rates must be positive");
    }
    // Each run of a sweep gets its own prompts (seed + k): a server's caches must not
    // turn one run's prompts into the next run's hits.
    let trace = |k: usize| workload::trace(&a.workload, a.requests, a.seed + k as u64, a.max_tokens).map(Arc::new);
    trace(0)?;
    let slo = Slo { ttft_ms: a.slo_ttft_ms, tpot_ms: a.slo_tpot_ms };
    let timeout = Duration::from_secs(a.timeout);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let runs = rt.block_on(async {
        let client = Client::connect(&a.target, &a.api, a.model.clone(), a.api_key.clone()).await?;
        let mut runs = Vec::new();
        if a.rate.is_empty() {
            runs.push(closed_loop(&client, &trace(0)?, a.concurrency.unwrap_or(8), timeout).await);
        } else {
            for (k, &r) in a.rate.iter().enumerate() {
                runs.push(open_loop(&client, &trace(k)?, r, a.seed + k as u64, timeout).await);
            }
        }
        Ok::<_, anyhow::Error>(runs)
    })?;
    let started = Instant::now();
    for r in &runs {
        let mut v = r.json(&slo);
        v["target"] = a.target.clone().into();
        v["api"] = a.api.clone().into();
        v["workload"] = a.workload.clone().into();
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
