//! `tandem profile`: measures on this machine the cost models `tandem sim` runs on, and
//! writes them as JSON (`sim::cost::Costs`):
//! - engine steps of the model at the given thread count: prefills of several lengths,
//!   prefills after a cached prefix, and decode batches of several sizes and contexts (the
//!   forward pass of `bench engine` plus a greedy draw per sequence), fitted to the step
//!   model of `sim::cost`, plus what the engine adds to a step beyond the forward pass (its
//!   `step()` timed at batch 1 and 8 against the fitted model);
//! - KV transfer over shared memory and TCP loopback, as `bench kvtransfer` sends it, fitted
//!   to a latency and a bandwidth; `--link NAME=LATENCY_MS@GBPS` adds links by hand;
//! - what the router adds to a request (render the chat template, tokenize, hash the
//!   prompt's blocks, pick among workers), and half a gRPC round trip on loopback for each
//!   control hop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use tandem_engine::kv_cache::{blocks_for_tokens, BlockId, KvCache, KvDtype};
use tandem_engine::model::{ForwardBatch, LogitsWanted, Model, ModelOptions, Scratch};
use tandem_kernels::Isa;
use tandem_text::model_text::ModelText;

use crate::sim::cost::{Costs, Link, Point, StepCost, StepShape};

const BLOCK: usize = 16;

#[derive(Args, Debug)]
pub struct ProfileArgs {
    #[arg(long, env = "TANDEM_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Kernel threads, as the workers to be simulated run (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Kernel family: scalar, avx2 or avx512.
    #[arg(long)]
    pub isa: Option<String>,
    /// Timed repetitions per point (the median is kept).
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Fewer, smaller points (seconds, not minutes): for tests.
    #[arg(long)]
    pub quick: bool,
    /// A link given by hand: `NAME=LATENCY_MS@GBPS` (e.g. `rdma=0.01@25`). Repeatable.
    #[arg(long = "link", value_parser = link_spec)]
    pub links: Vec<(String, Link)>,
    /// Skip the KV transfer measurements (links by hand only).
    #[arg(long)]
    pub no_kv: bool,
    /// Write the JSON here (default: stdout).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

fn link_spec(s: &str) -> Result<(String, Link), String> {
    let bad = || format!("{s:?} is not NAME=LATENCY_MS@GBPS");
    let (name, rest) = s.split_once('=').ok_or_else(bad)?;
    let (lat, bw) = rest.split_once('@').ok_or_else(bad)?;
    let link = Link { latency_ms: lat.parse().map_err(|_| bad())?, gb_per_s: bw.parse().map_err(|_| bad())? };
    if name.is_empty() || !(link.latency_ms >= 0.0 && link.gb_per_s > 0.0 && link.gb_per_s.is_finite()) {
        return Err(bad());
    }
    Ok((name.to_string(), link))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Milliseconds of one forward step in which each of `seqs` sequences computes `new` tokens
/// after `context` (the KV of the context is whatever the pool holds: its values do not
/// change the work), plus a greedy draw from each sequence's logits.
fn step_ms(model: &Model, seqs: usize, context: usize, new: usize, reps: usize) -> Result<f64> {
    let per_seq = blocks_for_tokens(context + new, BLOCK);
    let mut kv = KvCache::new(model.kv_shape(BLOCK), model.config.n_layers, seqs * per_seq, KvDtype::F16)?;
    let tables: Vec<Vec<BlockId>> =
        (0..seqs).map(|i| (i * per_seq..(i + 1) * per_seq).map(|x| BlockId(x as u32)).collect()).collect();
    let tokens: Vec<Vec<u32>> =
        (0..seqs).map(|i| (0..new).map(|j| 100 + ((i * 7919 + j * 104_729) % 30_000) as u32).collect()).collect();
    let mut scratch = Scratch::default();
    let vocab = model.config.vocab_size;
    let mut times = Vec::new();
    for rep in 0..reps + 1 {
        let mut batch = ForwardBatch::default();
        for (t, toks) in tables.iter().zip(&tokens) {
            let s = batch.add_seq(t);
            batch.add_tokens(s, toks, context, LogitsWanted::Last);
        }
        let t0 = Instant::now();
        let logits = model.forward(&batch, &mut kv, &mut scratch)?;
        let mut picked = 0usize;
        for row in logits.chunks(vocab) {
            picked += row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
        }
        std::hint::black_box(picked);
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(times))
}

/// What the engine adds to a step beyond the forward pass and a greedy draw (the
/// scheduler, sampling with the request's parameters, detokenizing, stop checks), in ms:
/// `(per step, per sequence)`, from `LlmEngine::step` timed at batch 1 and 8 against the
/// fitted forward-only model at the same shapes (decode steps, and each batch's prefill).
fn engine_overhead(a: &ProfileArgs, opts: &ModelOptions, forward: &StepCost) -> Result<EngineExtra> {
    use tandem_engine::llm_engine::{EngineRequest, LlmEngine, LlmEngineConfig};
    use tandem_engine::sampling::SamplingParams;
    let (text, model) = ModelText::open_with(&a.model, |f| Model::from_gguf(f, opts))?;
    let mut engine = LlmEngine::new(model, text.tokenizer, LlmEngineConfig { kv_blocks: 512, ..Default::default() })?;
    let steps = if a.quick { 8 } else { 24 };
    let add = |engine: &mut LlmEngine, b: usize, prompt_len: usize, max_tokens: usize, seed: usize| -> Result<()> {
        for i in 0..b {
            let prompt: Vec<u32> =
                (0..prompt_len).map(|j| 100 + ((seed * 31 + i * 7919 + j * 104_729) % 30_000) as u32).collect();
            let params = SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..SamplingParams::default() };
            engine.add_request(EngineRequest {
                prompt,
                params,
                n: 1,
                priority: 0,
                cache_salt: None,
                share: Default::default(),
                export_kv: false,
                resumed: 0,
            })?;
        }
        Ok(())
    };
    // Warm the engine's buffers at the largest shapes below first: a worker runs warm.
    add(&mut engine, 8, 48, 4, 1)?;
    while engine.has_unfinished() {
        engine.step()?;
    }
    let mut decode = Vec::new();
    let mut prefill = Vec::new();
    for (k, b) in [1usize, 8].into_iter().enumerate() {
        let prompt_len = 24;
        add(&mut engine, b, prompt_len, steps + 1, 10 + k)?;
        let mut extra = Vec::new();
        let mut pos = None;
        while engine.has_unfinished() {
            let t0 = Instant::now();
            engine.step()?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            match pos {
                None => {
                    prefill.push((ms - forward.seconds(&StepShape::uniform(b, 0, prompt_len)) * 1e3) / b as f64);
                    pos = Some(prompt_len);
                }
                Some(p) => {
                    extra.push(ms - forward.seconds(&StepShape::uniform(b, p, 1)) * 1e3);
                    pos = Some(p + 1);
                }
            }
        }
        decode.push(median(extra));
    }
    // A line through batch 1 and batch 8: per step and per sequence, neither negative.
    let per_seq = ((decode[1] - decode[0]) / 7.0).max(0.0);
    Ok(EngineExtra {
        step_ms: (decode[0] - per_seq).max(0.0),
        seq_ms: per_seq,
        prompt_ms: (median(prefill) - per_seq).max(0.0),
    })
}

/// What the engine adds to a step beyond the forward pass (see `engine_overhead`), ms.
struct EngineExtra {
    step_ms: f64,
    seq_ms: f64,
    /// Per sequence whose prompt a step computes, beyond the per-sequence cost.
    prompt_ms: f64,
}

/// (kind, sequences, context, new tokens) of each measured step.
fn plan(quick: bool) -> Vec<(&'static str, usize, usize, usize)> {
    if quick {
        return vec![
            ("prefill", 1, 0, 32),
            ("prefill", 1, 0, 128),
            ("prefill", 1, 0, 256),
            ("prefix", 1, 256, 64),
            ("decode", 1, 64, 1),
            ("decode", 4, 64, 1),
            ("decode", 8, 256, 1),
        ];
    }
    let mut v = vec![
        ("prefill", 1, 0, 16),
        ("prefill", 1, 0, 64),
        ("prefill", 1, 0, 256),
        ("prefill", 1, 0, 512),
        ("prefix", 1, 512, 128),
        ("prefix", 1, 1536, 512),
        ("prefix", 1, 3584, 512),
        ("prefill", 4, 0, 128),
    ];
    for b in [1, 4, 16, 32, 64] {
        for c in [128, 1024] {
            v.push(("decode", b, c, 1));
        }
    }
    v.push(("decode", 8, 4096, 1));
    v
}

/// Seconds per transfer of `tokens` of SmolLM2-shaped KV over shm or TCP (the best of `reps`).
async fn kv_seconds(shm: bool, tokens: &[usize], reps: usize) -> Result<Vec<(f64, f64)>> {
    use std::sync::Arc;
    use tandem_kvtransfer::{KvSender, TcpConfig};
    let max = *tokens.iter().max().expect("sizes");
    let cfg = TcpConfig::default();
    let s = crate::bench_kv::setup(shm, 16 * max.div_ceil(16), &cfg).await?;
    let tx = Arc::new(KvSender::new(crate::bench_kv::layout(), cfg));
    let mut out = Vec::new();
    let mut id = 1u64;
    for &t in tokens {
        let mut best = f64::INFINITY;
        let mut bytes = 0;
        for _ in 0..reps.max(1) + 1 {
            let (secs, b) = crate::bench_kv::run_once(&s, &tx, 1, t, id).await?;
            id += 1;
            best = best.min(secs);
            bytes = b;
        }
        out.push((bytes as f64, best));
    }
    tx.shutdown().await;
    s.rx.shutdown();
    Ok(out)
}

/// A latency and bandwidth through (bytes, seconds) points: least squares of a line.
fn fit_link(points: &[(f64, f64)]) -> Link {
    let n = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), p| (a + p.0, b + p.1));
    let (mx, my) = (sx / n, sy / n);
    let cov: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let slope = if var > 0.0 { (cov / var).max(1e-15) } else { my / mx.max(1.0) };
    let latency = (my - slope * mx).max(0.0);
    Link { latency_ms: latency * 1e3, gb_per_s: 1.0 / slope / 1e9 }
}

/// Milliseconds the router spends on a request before it reaches a worker: the chat
/// template, tokenizing, the prompt's block hashes and a pick among 8 workers.
fn router_ms(text: &ModelText) -> Result<f64> {
    use tandem_router::policy::{policy_by_name, Candidate};
    let template = text.chat_template.as_ref().context("the model has no chat template")?;
    let msg = "Summarize what the harbor notes say about the tides, the lighthouse and the winter storms, \
               in three short sentences for a visitor who arrives tomorrow morning by the early ferry.";
    let descs: Vec<tandem_cluster::WorkerDescriptor> = (0..8)
        .map(|i| tandem_cluster::WorkerDescriptor {
            id: tandem_cluster::WorkerId::new(format!("w{i}")).expect("id"),
            role: tandem_cluster::Role::Prefill,
            grpc_addr: String::new(),
            kv: tandem_cluster::KvEndpoints { tcp: "127.0.0.1:1".parse().expect("addr"), local: None },
            model: tandem_cluster::ModelInfo { name: "m".into(), fingerprint: 1 },
            block_size: BLOCK as u32,
            hash_scheme: None,
            context_length: 8192,
            lease: None,
        })
        .collect();
    let policy = policy_by_name("cache-aware", 2.0).expect("policy");
    let mut times = Vec::new();
    for _ in 0..50 {
        let t0 = Instant::now();
        let m = [tandem_text::chat::ChatMessage::new("user", msg)];
        let (ids, _) = tandem_text::prompt::chat_ids(&text.tokenizer, template, &m, true)?;
        let hashes = tandem_text::prefix::prefix_hashes(&ids[..ids.len() - 1], BLOCK, None);
        let c: Vec<Candidate> = descs
            .iter()
            .map(|d| Candidate {
                worker: d,
                stats: None,
                inflight: 0,
                inflight_tokens: 0,
                cached_tokens: Some(0),
                indexed_blocks: 0,
            })
            .collect();
        std::hint::black_box((policy.pick_prefill(&c, ids.len()), hashes.len()));
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

/// Half a gRPC round trip on loopback (a unary call to a health service, as tonic serves
/// the cluster's calls), ms: one control hop.
async fn grpc_hop_ms() -> Result<f64> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let (_reporter, health) = tandem_proto::health_service(&[]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tandem_proto::incoming::server().add_service(health).serve_with_incoming_shutdown(
        tandem_proto::incoming::incoming(listener, tandem_proto::incoming::HANDSHAKE_TIMEOUT),
        async {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut client = HealthClient::new(channel);
    let mut times = Vec::new();
    for i in 0..220 {
        let t0 = Instant::now();
        client.check(HealthCheckRequest { service: String::new() }).await?;
        if i >= 20 {
            times.push(t0.elapsed().as_secs_f64() * 1e3 / 2.0);
        }
    }
    let _ = stop.send(());
    let _ = server.await;
    Ok(median(times))
}

pub fn run(a: ProfileArgs) -> Result<()> {
    if a.repetitions == 0 {
        bail!("--repetitions must be positive");
    }
    let started = Instant::now();
    let mut opts = ModelOptions::default();
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    if let Some(s) = &a.isa {
        opts.isa = Some(Isa::parse(s).with_context(|| format!("unknown --isa {s}"))?);
    }
    let (text, model) = ModelText::open_with(&a.model, |f| Model::from_gguf(f, &opts))?;
    let cfg = &model.config;
    let name = cfg.name.clone().unwrap_or_else(|| cfg.architecture.clone());
    let mut measured = Vec::new();
    for (kind, seqs, context, new) in plan(a.quick) {
        let ms = step_ms(&model, seqs, context, new, a.repetitions)?;
        eprintln!("step {kind:>7}: {seqs:>3} seqs × {new:>4} new after {context:>5}: {ms:9.2} ms");
        measured.push((kind, seqs, context, new, ms));
    }
    let points: Vec<(StepShape, f64)> =
        measured.iter().map(|&(_, s, c, n, ms)| (StepShape::uniform(s, c, n), ms)).collect();
    let forward = StepCost::fit(&points)?;
    let e = engine_overhead(&a, &opts, &forward)?;
    eprintln!(
        "engine beyond the forward pass: {:.2} ms a step + {:.3} ms a sequence + {:.2} ms a prompt",
        e.step_ms, e.seq_ms, e.prompt_ms
    );
    let step = StepCost {
        base_ms: forward.base_ms + e.step_ms,
        seq_ms: forward.seq_ms + e.seq_ms,
        prompt_ms: e.prompt_ms,
        ..forward
    };
    let points = measured
        .iter()
        .map(|&(kind, seqs, context, new_tokens, measured_ms)| Point {
            kind: kind.into(),
            seqs,
            context,
            new_tokens,
            measured_ms,
            fitted_ms: forward.seconds(&StepShape::uniform(seqs, context, new_tokens)) * 1e3,
        })
        .collect();
    let mut links = BTreeMap::new();
    if !a.no_kv {
        let sizes: &[usize] = if a.quick { &[64, 512] } else { &[64, 256, 1024, 4096] };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        for (name, shm) in [("shm", true), ("tcp", false)] {
            let pts = rt.block_on(kv_seconds(shm, sizes, a.repetitions))?;
            let link = fit_link(&pts);
            eprintln!("kv {name}: {:.3} ms + {:.2} GB/s", link.latency_ms, link.gb_per_s);
            links.insert(name.to_string(), link);
        }
    }
    for (n, l) in &a.links {
        links.insert(n.clone(), *l);
    }
    let kv_bytes_per_token = (2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * KvDtype::F16.bytes()) as f64;
    let costs = Costs {
        source: format!(
            "tandem profile: {name}, {} threads, {}{}",
            model.threads(),
            std::env::consts::ARCH,
            if a.quick { ", quick" } else { "" }
        ),
        step,
        kv_bytes_per_token,
        layers: cfg.n_layers,
        links,
        router_ms: router_ms(&text)?,
        rpc_ms: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(grpc_hop_ms())?,
        kv_blocks: blocks_for_tokens(cfg.context_length.min(8192), BLOCK),
        block_size: BLOCK,
        points,
    };
    costs.check()?;
    let json = serde_json::to_string_pretty(&costs)? + "\n";
    match &a.out {
        Some(p) => std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{json}"),
    }
    eprintln!(
        "step model: {:.3} ms + {:.4} ms/token + {:.3} ms/seq + {:.5} ms/k pairs · router {:.3} ms · hop {:.3} ms · {:.0} s",
        step.base_ms,
        step.token_ms,
        step.seq_ms,
        step.attn_ms,
        costs.router_ms,
        costs.rpc_ms,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_fitted_through_its_points_and_given_by_hand() {
        let l = fit_link(&[(1e6, 0.001 + 1e6 / 2e9), (4e6, 0.001 + 4e6 / 2e9), (16e6, 0.001 + 16e6 / 2e9)]);
        assert!((l.latency_ms - 1.0).abs() < 1e-6 && (l.gb_per_s - 2.0).abs() < 1e-6, "{l:?}");
        assert_eq!(link_spec("rdma=0.01@25").unwrap(), ("rdma".into(), Link { latency_ms: 0.01, gb_per_s: 25.0 }));
        for bad in ["rdma", "rdma=1", "=1@2", "x=1@0", "x=-1@2", "x=a@b"] {
            assert!(link_spec(bad).is_err(), "{bad}");
        }
    }
}
