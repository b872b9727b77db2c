//! `tandem bench migrate`: what moving a running request costs, live (its KV moves) and
//! by recompute (its tokens are prefilled again elsewhere), on a `tandem up` of one prefill
//! and two decode workers that this command starts (a child process per configuration).
//!
//! - `--scenario moves` (the default): one greedy request of `--contexts` tokens streams;
//!   after `--tokens-before` tokens its decode worker is asked to move it (`Migrate`
//!   `REQUEST`, as `tandem worker migrate` does). Reported per context: the longest gap
//!   between two tokens after the ask (the downtime the client sees), that gap in decode
//!   steps (the median gap before the ask), and the time from the ask to the first token
//!   after the gap. Methods: `live`; `recompute` (the router's `--live-migration false`: the
//!   prefill worker's prefix cache still holds the prompt, so only the KV is sent again and
//!   the generated tokens recomputed); `recompute-cold` (no prefix cache anywhere: the
//!   whole context is prefilled again). Transports: `shm` (same host) and `tcp`.
//! - `--scenario drain`: `--requests` streams; once a decode worker runs at least a quarter
//!   of them it is drained (`Drain`). Reported per method: the time until it holds nothing
//!   (when it could exit), and the tokens the prefill worker computed beyond the prompts
//!   (recomputed). Methods: `wait` (today's drain: wait for them to finish), `live`,
//!   `recompute`.
//!
//! Timing is wall clock on a shared machine: compare methods within one run.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tandem_proto::auth::{ClusterToken, WorkerChannel};
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::v1::generate_client::GenerateClient;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;

#[derive(Args, Debug)]
pub struct MigrateBenchArgs {
    #[arg(long, env = "TANDEM_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// `moves` (one request moved, per context length) or `drain` (a worker drained).
    #[arg(long, default_value = "moves", value_parser = ["moves", "drain"])]
    pub scenario: String,
    /// Moves: context lengths in tokens (the prompt; the move comes `--tokens-before` later).
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096,8000")]
    pub contexts: Vec<usize>,
    /// Moves: `live`, `recompute`, `recompute-cold`. Drain: `wait`, `live`, `recompute`.
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Moves: `shm`, `tcp`.
    #[arg(long, value_delimiter = ',', default_value = "shm,tcp")]
    pub transports: Vec<String>,
    /// Moves: tokens streamed before the ask.
    #[arg(long, default_value_t = 24)]
    pub tokens_before: usize,
    /// Moves: tokens streamed after the ask.
    #[arg(long, default_value_t = 24)]
    pub tokens_after: usize,
    /// Drain: streams started at once.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Drain: prompt tokens per stream.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Drain: tokens each stream generates (long enough for the streams to overlap).
    #[arg(long, default_value_t = 384)]
    pub max_tokens: u32,
    /// Kernel threads per worker.
    #[arg(long, default_value_t = 1)]
    pub threads_per_worker: usize,
    /// Print one JSON object per measurement.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: MigrateBenchArgs) -> Result<()> {
    if !a.model.exists() {
        bail!("model {} missing: run scripts/fetch-model.sh", a.model.display());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        match a.scenario.as_str() {
            "moves" => moves(&a).await,
            _ => drain(&a).await,
        }
    })
}

/// A `tandem up` of one prefill and two decode workers, in a child process.
struct Up {
    child: Child,
    router: String,
    /// Decode workers: (id, gRPC address).
    decode: Vec<(String, String)>,
    prefill: String,
    token: ClusterToken,
    _dir: TempDir,
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Up {
    /// Starts it with `extra` flags; waits until it serves.
    fn start(a: &MigrateBenchArgs, extra: &[&str]) -> Result<Up> {
        let dir = std::env::temp_dir().join(format!("tandem-bench-migrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let dir = TempDir(dir);
        let token_file = dir.0.join("token");
        let secret: String = (0..48).map(|i| char::from(b'a' + ((rand_u64(i) % 26) as u8))).collect();
        std::fs::write(&token_file, &secret)?;
        let token = crate::cluster_token::TokenFlags { cluster_token_file: Some(token_file.clone()) }.load("bench")?.0;
        let port = |i| free_port().with_context(|| format!("a free port ({i})"));
        let (grpc, http) = (port(0)?, port(1)?);
        let threads = a.threads_per_worker.to_string();
        let mut args = vec![
            "up".to_string(),
            "--model".into(),
            a.model.display().to_string(),
            "--prefill-workers".into(),
            "1".into(),
            "--decode-workers".into(),
            "2".into(),
            "--threads-per-worker".into(),
            threads,
            "--grpc-port".into(),
            grpc.to_string(),
            "--http-port".into(),
            http.to_string(),
            "--cluster-token-file".into(),
            token_file.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        // `TANDEM_BENCH_LOG=info` shows the cluster's log (on stderr).
        let log = std::env::var("TANDEM_BENCH_LOG").ok();
        let mut child = Command::new(std::env::current_exe()?)
            .args(&args)
            .env("RUST_LOG", log.as_deref().unwrap_or("warn"))
            .stdout(Stdio::piped())
            .stderr(if log.is_some() { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .context("starting tandem up")?;
        let out = child.stdout.take().expect("piped");
        let (mut decode, mut prefill) = (Vec::new(), String::new());
        let end = Instant::now() + Duration::from_secs(120);
        for line in BufReader::new(out).lines() {
            let line = line?;
            // "tandem: worker decode-0 (decode) grpc 127.0.0.1:PORT kv ..."
            if let Some(rest) = line.strip_prefix("tandem: worker ") {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let addr = words.iter().position(|w| *w == "grpc").and_then(|i| words.get(i + 1));
                match (words.first(), words.get(1), addr) {
                    (Some(id), Some(role), Some(addr)) if role.starts_with("(decode") => {
                        decode.push((id.to_string(), addr.to_string()))
                    }
                    (Some(_), Some(role), Some(addr)) if role.starts_with("(prefill") => prefill = addr.to_string(),
                    _ => {}
                }
            }
            if line == "tandem: ready" {
                break;
            }
            if Instant::now() > end {
                bail!("tandem up did not get ready within 120 s");
            }
        }
        if decode.len() != 2 || prefill.is_empty() {
            let _ = child.kill();
            bail!("tandem up did not list its workers (decode {decode:?}, prefill {prefill:?})");
        }
        Ok(Up { child, router: format!("127.0.0.1:{grpc}"), decode, prefill, token, _dir: dir })
    }

    async fn worker(&self, addr: &str) -> Result<WorkerClient<WorkerChannel>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
        Ok(tandem_proto::auth::worker_client(channel, Some(&self.token)))
    }

    /// Prompt tokens the prefill worker has computed (looked up, less those found cached).
    async fn computed(&self) -> Result<u64> {
        let mut w = self.worker(&self.prefill).await?;
        let s = w.stats(pb::StatsRequest {}).await?.into_inner();
        Ok(s.prefix_cache_queried_tokens - s.prefix_cache_hit_tokens)
    }

    async fn running(&self, addr: &str) -> Result<u32> {
        Ok(self.worker(addr).await?.stats(pb::StatsRequest {}).await?.into_inner().running)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A pseudo-random u64 (splitmix64 of `i` and the clock): prompts no cache holds.
fn rand_u64(i: u64) -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut z = t.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` token ids no earlier prompt shares (common-word range of the vocabulary).
fn prompt(n: usize, salt: u64) -> Vec<u32> {
    (0..n).map(|i| 300 + (rand_u64(salt.wrapping_mul(1_000_003) + i as u64) % 20_000) as u32).collect()
}

fn request(tokens: Vec<u32>, max_tokens: u32) -> api::GenerateRequest {
    api::GenerateRequest {
        input: Some(api::generate_request::Input::PromptTokens(api::PromptTokens { token_ids: tokens })),
        sampling: Some(api::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One move's measurement.
#[derive(Debug)]
struct Move {
    transport: String,
    method: String,
    context: usize,
    moved: bool,
    /// Longest gap between two tokens after the ask.
    gap_ms: f64,
    /// Median gap before it (a decode step of this one-request batch).
    step_ms: f64,
    /// From the ask to the first token after the longest gap.
    total_ms: f64,
}

async fn moves(a: &MigrateBenchArgs) -> Result<()> {
    let methods = if a.methods.is_empty() {
        vec!["live".to_string(), "recompute".into(), "recompute-cold".into()]
    } else {
        a.methods.clone()
    };
    if !a.json {
        println!("transport  method          context  moved  downtime ms  steps  ask->resumed ms");
    }
    for transport in &a.transports {
        for method in &methods {
            let mut extra: Vec<&str> = Vec::new();
            match transport.as_str() {
                "shm" => {}
                "tcp" => extra.push("--no-shm"),
                t => bail!("--transports: unknown {t:?} (shm, tcp)"),
            }
            match method.as_str() {
                "live" => {}
                "recompute" => extra.extend(["--live-migration", "false"]),
                "recompute-cold" => extra.extend(["--live-migration", "false", "--no-prefix-cache"]),
                m => bail!("--methods: unknown {m:?} (live, recompute, recompute-cold)"),
            }
            let up = Up::start(a, &extra)?;
            for (i, &context) in a.contexts.iter().enumerate() {
                let m = one_move(a, &up, transport, method, context, i as u64).await?;
                report_move(a.json, &m);
            }
        }
    }
    Ok(())
}

async fn one_move(
    a: &MigrateBenchArgs,
    up: &Up,
    transport: &str,
    method: &str,
    context: usize,
    salt: u64,
) -> Result<Move> {
    let mut client = GenerateClient::connect(format!("http://{}", up.router)).await?;
    let total = (a.tokens_before + a.tokens_after + 8) as u32;
    let mut s = client.generate_stream(request(prompt(context, salt), total)).await?.into_inner();
    let mut arrivals: Vec<Instant> = Vec::new();
    let mut asked: Option<(Instant, String)> = None;
    while let Some(m) = tokio::time::timeout(Duration::from_secs(300), s.message())
        .await
        .map_err(|_| anyhow!("no token for 300 s"))??
    {
        let now = Instant::now();
        arrivals.extend(std::iter::repeat_n(now, m.token_ids.len()));
        if asked.is_none() && arrivals.len() >= a.tokens_before {
            // Where it decodes: the decode worker running one request.
            let mut from = None;
            for (id, addr) in &up.decode {
                if up.running(addr).await? > 0 {
                    from = Some((id.clone(), addr.clone()));
                }
            }
            let (id, addr) = from.ok_or_else(|| anyhow!("no decode worker runs the request"))?;
            let req = pb::MigrateRequest {
                step: pb::MigrateStep::Request as i32,
                count: 1,
                required: method != "live",
                ..Default::default()
            };
            let t = Instant::now();
            up.worker(&addr).await?.migrate(req).await.context("asking for the move")?;
            asked = Some((t, id));
        }
        if arrivals.len() >= a.tokens_before + a.tokens_after {
            break;
        }
    }
    drop(s);
    let (t, from) = asked.ok_or_else(|| anyhow!("the request ended before the move"))?;
    let before: Vec<f64> = arrivals
        .windows(2)
        .filter(|w| w[1] <= t)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .filter(|g| *g > 0.0)
        .collect();
    let step_ms = median(before);
    let after: Vec<Instant> = std::iter::once(t).chain(arrivals.iter().copied().filter(|&x| x > t)).collect();
    let (gap, end) = after.windows(2).map(|w| ((w[1] - w[0]).as_secs_f64() * 1e3, w[1])).fold((0.0, t), |best, x| {
        if x.0 > best.0 {
            x
        } else {
            best
        }
    });
    // Moved if the request ended on the other decode worker (cancelled by now: count it from
    // the workers' stats would race; the source's running count drops to 0 either way).
    let moved = !up.decode.is_empty() && {
        let src = up.decode.iter().find(|(id, _)| *id == from).map(|(_, a)| a.clone()).unwrap_or_default();
        up.running(&src).await.unwrap_or(1) == 0
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(Move {
        transport: transport.into(),
        method: method.into(),
        context,
        moved,
        gap_ms: gap,
        step_ms,
        total_ms: (end - t).as_secs_f64() * 1e3,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report_move(json: bool, m: &Move) {
    let steps = if m.step_ms > 0.0 { m.gap_ms / m.step_ms } else { 0.0 };
    if json {
        println!(
            "{{\"scenario\":\"moves\",\"transport\":\"{}\",\"method\":\"{}\",\"context\":{},\"moved\":{},\
             \"downtime_ms\":{:.2},\"step_ms\":{:.2},\"downtime_steps\":{:.2},\"total_ms\":{:.2}}}",
            m.transport, m.method, m.context, m.moved, m.gap_ms, m.step_ms, steps, m.total_ms
        );
    } else {
        println!(
            "{:<10} {:<15} {:>7}  {:<5}  {:>11.1}  {:>5.1}  {:>15.1}",
            m.transport,
            m.method,
            m.context,
            if m.moved { "yes" } else { "no" },
            m.gap_ms,
            steps,
            m.total_ms
        );
    }
}

async fn drain(a: &MigrateBenchArgs) -> Result<()> {
    let methods = if a.methods.is_empty() {
        vec!["wait".to_string(), "live".into(), "recompute".into()]
    } else {
        a.methods.clone()
    };
    if !a.json {
        println!("method      requests  on worker  drained in s  tokens recomputed");
    }
    for method in &methods {
        let extra: &[&str] = match method.as_str() {
            "wait" | "live" => &[],
            "recompute" => &["--live-migration", "false"],
            m => bail!("--methods: unknown {m:?} (wait, live, recompute)"),
        };
        let up = Up::start(a, extra)?;
        let c0 = up.computed().await?;
        let mut tasks = Vec::new();
        for i in 0..a.requests {
            let router = up.router.clone();
            let req = request(prompt(a.prompt_tokens, 7_000 + i as u64), a.max_tokens);
            tasks.push(tokio::spawn(async move {
                let mut c = GenerateClient::connect(format!("http://{router}")).await?;
                let mut s = c.generate_stream(req).await?.into_inner();
                let mut prompt = 0u64;
                while let Some(m) = s.message().await? {
                    if let Some(u) = m.usage {
                        prompt = u.prompt_tokens as u64;
                    }
                }
                Ok::<u64, anyhow::Error>(prompt)
            }));
        }
        // Drain the first decode worker once it runs a quarter of the streams.
        let (_, addr) = up.decode[0].clone();
        let end = Instant::now() + Duration::from_secs(300);
        let on_it = loop {
            let n = up.running(&addr).await?;
            if n as usize >= a.requests / 4 {
                break n;
            }
            if Instant::now() > end {
                bail!("decode worker {addr} never ran {} streams at once", a.requests / 4);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let t = Instant::now();
        let req = pb::DrainRequest { deadline_ms: None, migrate: method != "wait" };
        let mut status = up.worker(&addr).await?.drain(req).await?.into_inner();
        while let Some(s) = status.message().await? {
            if s.drained {
                break;
            }
        }
        let drained = t.elapsed();
        let mut prompts = 0;
        for t in tasks {
            prompts += t.await??;
        }
        // The prompts share nothing: each was computed once; the rest was recomputed.
        let recomputed = (up.computed().await? - c0).saturating_sub(prompts);
        if a.json {
            println!(
                "{{\"scenario\":\"drain\",\"method\":\"{method}\",\"requests\":{},\"on_worker\":{on_it},\
                 \"drained_s\":{:.3},\"tokens_recomputed\":{recomputed}}}",
                a.requests,
                drained.as_secs_f64()
            );
        } else {
            println!("{method:<10}  {:>8}  {on_it:>9}  {:>12.2}  {recomputed:>17}", a.requests, drained.as_secs_f64());
        }
    }
    Ok(())
}
