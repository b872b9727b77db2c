//! `tandem bench serve`: a closed-loop load generator against Tandem's gRPC API.
//! `--concurrency` clients each send their next request when the previous one
//! ends, until `--requests` have been sent. Prompts come from a seeded
//! generator, so two runs (or two servers) see the same trace. Reports time to
//! first token, time per output token and end-to-end latency percentiles, and
//! request and token throughput. Greedy, with EOS ignored, so every request
//! generates exactly `--max-tokens`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::v1::generate_client::GenerateClient;

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    /// The router's gRPC address (host:port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub target: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// `chat`: short chat prompts; `summarize`: ~1,000-token prompts.
    #[arg(long, default_value = "chat")]
    pub workload: String,
    /// Seed of the prompt generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Give up on the whole run after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// API key sent as `authorization: Bearer <key>` (when the cluster requires one).
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

const TOPICS: [&str; 16] = [
    "rivers",
    "bread",
    "the moon",
    "chess",
    "volcanoes",
    "bees",
    "trains",
    "jazz",
    "glaciers",
    "paper",
    "owls",
    "bridges",
    "tea",
    "comets",
    "maps",
    "violins",
];
const WORDS: [&str; 24] = [
    "market", "river", "engine", "winter", "signal", "harvest", "orbit", "ledger", "canvas", "thunder", "copper",
    "meadow", "lantern", "harbor", "circuit", "granite", "pepper", "velvet", "summit", "archive", "falcon", "quartz",
    "tunnel", "willow",
];

fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn request(workload: &str, i: usize, seed: u64, max_tokens: u32) -> Result<api::GenerateRequest> {
    let mut st = seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let text = match workload {
        "chat" => {
            let t = TOPICS[next(&mut st) as usize % TOPICS.len()];
            let ask = ["Tell me about", "Write a short poem about", "Explain", "Give three facts about"];
            format!("{} {t}.", ask[next(&mut st) as usize % ask.len()])
        }
        "summarize" => {
            let words: Vec<&str> = (0..900).map(|_| WORDS[next(&mut st) as usize % WORDS.len()]).collect();
            format!("Summarize the following notes in one sentence.\n\n{}", words.join(" "))
        }
        other => bail!("unknown workload {other:?} (chat, summarize)"),
    };
    Ok(api::GenerateRequest {
        input: Some(api::generate_request::Input::Messages(api::Messages {
            messages: vec![api::ChatMessage { role: "user".into(), content: text }],
        })),
        sampling: Some(api::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    ttft: Duration,
    e2e: Duration,
    tokens: usize,
    prompt_tokens: usize,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.total_cmp(b));
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    serde_json::json!({"mean": mean, "p50": pct(&v, 0.5), "p90": pct(&v, 0.9), "p99": pct(&v, 0.99)})
}

pub fn run(a: ServeBenchArgs) -> Result<()> {
    if a.concurrency == 0 || a.requests == 0 || a.max_tokens == 0 {
        bail!("--concurrency, --requests and --max-tokens must be positive");
    }
    request(&a.workload, 0, a.seed, a.max_tokens)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (samples, wall) = rt.block_on(async {
        let client = GenerateClient::connect(format!("http://{}", a.target))
            .await
            .with_context(|| format!("connecting to {}", a.target))?;
        let next_i = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..a.concurrency {
            let (mut c, next_i, samples) = (client.clone(), next_i.clone(), samples.clone());
            let (workload, seed, max_tokens, n) = (a.workload.clone(), a.seed, a.max_tokens, a.requests);
            let key = a.api_key.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next_i.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let mut req = tonic::Request::new(request(&workload, i, seed, max_tokens)?);
                    if let Some(k) = &key {
                        let v = format!("Bearer {k}")
                            .parse()
                            .map_err(|_| anyhow!("the API key is not a valid header value"))?;
                        req.metadata_mut().insert("authorization", v);
                    }
                    let t0 = Instant::now();
                    let mut s = c.generate_stream(req).await.map_err(|e| anyhow!("request {i}: {e}"))?.into_inner();
                    let (mut ttft, mut tokens, mut prompt_tokens) = (None, 0, 0);
                    while let Some(m) = s.message().await.map_err(|e| anyhow!("request {i}: {e}"))? {
                        if ttft.is_none() && !m.token_ids.is_empty() {
                            ttft = Some(t0.elapsed());
                        }
                        tokens += m.token_ids.len();
                        if let Some(u) = m.usage {
                            prompt_tokens = u.prompt_tokens as usize;
                        }
                    }
                    let e2e = t0.elapsed();
                    samples.lock().expect("samples").push(Sample {
                        ttft: ttft.unwrap_or(e2e),
                        e2e,
                        tokens,
                        prompt_tokens,
                    });
                }
            }));
        }
        let all = async {
            for t in tasks {
                t.await??;
            }
            Ok::<(), anyhow::Error>(())
        };
        tokio::time::timeout(Duration::from_secs(a.timeout), all)
            .await
            .map_err(|_| anyhow!("the run took longer than --timeout {} s", a.timeout))??;
        let wall = start.elapsed();
        let samples = samples.lock().expect("samples").clone();
        Ok::<_, anyhow::Error>((samples, wall))
    })?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let ttft = summary(samples.iter().map(|s| ms(s.ttft)).collect());
    let tpot =
        summary(samples.iter().filter(|s| s.tokens > 1).map(|s| ms(s.e2e - s.ttft) / (s.tokens - 1) as f64).collect());
    let e2e = summary(samples.iter().map(|s| ms(s.e2e)).collect());
    let out = serde_json::json!({
        "target": a.target, "workload": a.workload, "concurrency": a.concurrency, "requests": samples.len(),
        "max_tokens": a.max_tokens, "wall_s": wall.as_secs_f64(),
        "prompt_tokens_mean": samples.iter().map(|s| s.prompt_tokens).sum::<usize>() as f64 / samples.len().max(1) as f64,
        "throughput_rps": samples.len() as f64 / wall.as_secs_f64(),
        "output_tok_s": tokens as f64 / wall.as_secs_f64(),
        "ttft_ms": ttft, "tpot_ms": tpot, "e2e_ms": e2e,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "{} requests ({} workload: {:.0} prompt tokens on average, {} output tokens each; concurrency {}) in {:.2} s",
            samples.len(),
            a.workload,
            out["prompt_tokens_mean"].as_f64().unwrap_or(0.0),
            a.max_tokens,
            a.concurrency,
            wall.as_secs_f64()
        );
        let f = |k: &str| out[k].as_f64().unwrap_or(0.0);
        println!("throughput   {:.2} req/s, {:.1} output tok/s", f("throughput_rps"), f("output_tok_s"));
        for (name, v) in [("ttft", &out["ttft_ms"]), ("tpot", &out["tpot_ms"]), ("e2e", &out["e2e_ms"])] {
            println!(
                "{name:<12} mean {:>8.1} ms  p50 {:>8.1}  p90 {:>8.1}  p99 {:>8.1}",
                v["mean"].as_f64().unwrap_or(0.0),
                v["p50"].as_f64().unwrap_or(0.0),
                v["p90"].as_f64().unwrap_or(0.0),
                v["p99"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}
