//! `tandem bench engine`: prefill and decode throughput of the forward pass,
//! in the shape of llama.cpp's `llama-bench` (pp = prompt processing, tg =
//! token generation) so the two can be read side by side.
//!
//! Tokens are fixed pseudo-random ids; sampling is not timed (as in llama-bench).
//!
//! `--offline` measures the whole engine instead (scheduler, sampling,
//! detokenization): N requests submitted at once and run to completion.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tandem_engine::kv_cache::{blocks_for_tokens, BlockId, KvCache, KvDtype};
use tandem_engine::llm_engine::{EngineRequest, LlmEngine, LlmEngineConfig};
use tandem_engine::model::{ForwardBatch, LogitsWanted, Model, ModelOptions, Scratch};
use tandem_engine::sampling::SamplingParams;
use tandem_engine::scheduler::SchedulerConfig;
use tandem_kernels::Isa;
use tandem_text::gguf::GgufFile;
use tandem_text::tokenizer::Tokenizer;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Prefill at 128 and 512 tokens; decode at batch 1, 8 and 32 with 256 tokens of context each.
    Engine(EngineBenchArgs),
    /// KV transfer throughput and latency over TCP loopback and shared memory.
    Kvtransfer(crate::bench_kv::KvBenchArgs),
    /// Closed-loop load against a running cluster's gRPC API: TTFT, TPOT, throughput.
    Serve(crate::bench_serve::ServeBenchArgs),
    /// The router's prefix index: hashing and lookup time per request at a given size.
    Index(crate::bench_index::IndexBenchArgs),
    /// Moving running requests: live migration against recompute, per context length and
    /// transport, and a drained worker's time to exit.
    Migrate(crate::bench_migrate::MigrateBenchArgs),
    /// Constrained decoding: time per output token under small and large JSON Schemas
    /// against none, and time to first token with a guide compiled cold or from the cache.
    Guide(crate::bench_guide::GuideBenchArgs),
}

#[derive(Args, Debug)]
pub struct EngineBenchArgs {
    #[arg(long, env = "TANDEM_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Kernel threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Kernel family: scalar, avx2 or avx512.
    #[arg(long)]
    pub isa: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Timed repetitions per test (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Decode steps per timed repetition.
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Run only these tests (e.g. `pp512,tg32`); default: all of pp128, pp512, tg1, tg8, tg32.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Offline throughput instead: submit `--requests` at once and run them to completion
    /// through the scheduler (vLLM's throughput-benchmark shape).
    #[arg(long)]
    pub offline: bool,
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 256)]
    pub input_len: usize,
    /// Generated tokens per request (EOS ignored).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Leading prompt tokens shared by every request.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_len: usize,
    /// KV blocks of 16 tokens in the pool.
    #[arg(long, default_value_t = 2048)]
    pub kv_blocks: usize,
    /// Sequences running at once at most.
    #[arg(long, default_value_t = 64)]
    pub max_seqs: usize,
    /// Tokens per step at most.
    #[arg(long, default_value_t = 512)]
    pub max_batched_tokens: usize,
}

const BLOCK: usize = 16;
const PREFILL: [usize; 2] = [128, 512];
const DECODE_BATCH: [usize; 3] = [1, 8, 32];
const DECODE_CONTEXT: usize = 256;

pub fn run(cmd: BenchCommand) -> Result<()> {
    let a = match cmd {
        BenchCommand::Engine(a) => a,
        BenchCommand::Kvtransfer(a) => return crate::bench_kv::run(a),
        BenchCommand::Serve(a) => return crate::bench_serve::run(a),
        BenchCommand::Guide(a) => return crate::bench_guide::run(a),
        BenchCommand::Index(a) => return crate::bench_index::run(a),
        BenchCommand::Migrate(a) => return crate::bench_migrate::run(a),
    };
    if a.offline {
        return offline(&a);
    }
    let mut opts = ModelOptions::default();
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    if let Some(s) = &a.isa {
        opts.isa = Some(Isa::parse(s).with_context(|| format!("unknown --isa {s}"))?);
    }
    let model = Model::load(&a.model, &opts)?;
    let reps = a.repetitions.max(1);
    let name = model.config.name.clone().unwrap_or_else(|| "model".into());
    let size_mib = model.weight_bytes() as f64 / (1 << 20) as f64;
    if !a.json {
        println!("| model | size | threads | isa | test | t/s |");
        println!("| --- | ---: | ---: | --- | --- | ---: |");
    }
    let row = |test: &str, v: f64| {
        if !a.json {
            println!("| {name} | {size_mib:.1} MiB | {} | {} | {test} | {v:.2} |", model.threads(), model.isa().name());
        }
    };

    let mut prefill = serde_json::Map::new();
    let wanted = |name: &str| a.only.is_empty() || a.only.iter().any(|o| o == name);
    for n in PREFILL.into_iter().filter(|n| wanted(&format!("pp{n}"))) {
        let v = median((0..reps + 1).map(|_| prefill_once(&model, n)).skip(1).collect())?;
        row(&format!("pp{n}"), v);
        prefill.insert(n.to_string(), v.into());
    }
    let mut decode = serde_json::Map::new();
    for b in DECODE_BATCH.into_iter().filter(|b| wanted(&format!("tg{b}"))) {
        let v = decode_bench(&model, b, a.decode_steps.max(1), reps)?;
        row(&format!("tg b{b} @ ctx{DECODE_CONTEXT}"), v);
        decode.insert(b.to_string(), v.into());
    }
    if a.json {
        let out = serde_json::json!({
            "prefill_tok_s": prefill,
            "decode_tok_s": decode,
            "threads": model.threads(),
            "isa": model.isa().name(),
        });
        println!("{out}");
    }
    Ok(())
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            100 + (s % 40_000) as u32
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> Result<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().context("no measurements")
}

/// Tokens per second for one prompt of `n` tokens on a fresh cache.
fn prefill_once(model: &Model, n: usize) -> f64 {
    let mut kv = KvCache::new(model.kv_shape(BLOCK), model.config.n_layers, blocks_for_tokens(n, BLOCK), KvDtype::F16)
        .expect("kv cache");
    let table: Vec<BlockId> = (0..kv.n_blocks as u32).map(BlockId).collect();
    let toks = tokens(n, n as u64);
    let mut batch = ForwardBatch::default();
    let s = batch.add_seq(&table);
    batch.add_tokens(s, &toks, 0, LogitsWanted::Last);
    let mut scratch = Scratch::default();
    let t0 = Instant::now();
    model.forward(&batch, &mut kv, &mut scratch).expect("forward");
    n as f64 / t0.elapsed().as_secs_f64()
}

/// Generated tokens per second across `b` sequences that each hold `DECODE_CONTEXT` tokens.
fn decode_bench(model: &Model, b: usize, steps: usize, reps: usize) -> Result<f64> {
    let per_seq = blocks_for_tokens(DECODE_CONTEXT + steps * (reps + 1), BLOCK);
    let mut kv = KvCache::new(model.kv_shape(BLOCK), model.config.n_layers, b * per_seq, KvDtype::F16)?;
    let tables: Vec<Vec<BlockId>> =
        (0..b).map(|i| (i * per_seq..(i + 1) * per_seq).map(|x| BlockId(x as u32)).collect()).collect();
    let mut scratch = Scratch::default();
    // Fill every sequence's context, up to 512 tokens per forward call.
    let prompts: Vec<Vec<u32>> = (0..b).map(|i| tokens(DECODE_CONTEXT, 1000 + i as u64)).collect();
    for chunk in (0..b).collect::<Vec<_>>().chunks((512 / DECODE_CONTEXT).max(1)) {
        let mut batch = ForwardBatch::default();
        for &i in chunk {
            let s = batch.add_seq(&tables[i]);
            batch.add_tokens(s, &prompts[i], 0, LogitsWanted::Last);
        }
        model.forward(&batch, &mut kv, &mut scratch)?;
    }
    let mut pos = DECODE_CONTEXT;
    let mut rates = Vec::new();
    for rep in 0..reps + 1 {
        let t0 = Instant::now();
        for _ in 0..steps {
            let mut batch = ForwardBatch::default();
            for (i, table) in tables.iter().enumerate() {
                let s = batch.add_seq(table);
                batch.add_tokens(s, &[prompts[i][pos % DECODE_CONTEXT]], pos, LogitsWanted::Last);
            }
            model.forward(&batch, &mut kv, &mut scratch)?;
            pos += 1;
        }
        if rep > 0 {
            rates.push((b * steps) as f64 / t0.elapsed().as_secs_f64());
        }
    }
    median(rates)
}

/// Offline throughput: every request submitted at once, run to completion.
fn offline(a: &EngineBenchArgs) -> Result<()> {
    if a.requests == 0 || a.input_len == 0 || a.output_len == 0 {
        anyhow::bail!("--requests, --input-len and --output-len must be positive");
    }
    if a.shared_prefix_len >= a.input_len {
        anyhow::bail!("--shared-prefix-len must be shorter than --input-len");
    }
    let mut opts = ModelOptions::default();
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    if let Some(s) = &a.isa {
        opts.isa = Some(Isa::parse(s).with_context(|| format!("unknown --isa {s}"))?);
    }
    let file = GgufFile::open(&a.model)?;
    let model = Model::from_gguf(&file, &opts)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    drop(file);
    let threads = model.threads();
    let cfg = LlmEngineConfig {
        kv_blocks: a.kv_blocks,
        block_size: BLOCK,
        scheduler: SchedulerConfig {
            max_seqs: a.max_seqs,
            max_batched_tokens: a.max_batched_tokens,
            max_waiting: a.requests.max(1),
            ..SchedulerConfig::default()
        },
        ..LlmEngineConfig::default()
    };
    let mut engine = LlmEngine::new(model, tokenizer, cfg)?;
    let shared = tokens(a.shared_prefix_len, 7);
    let params =
        SamplingParams { temperature: 0.0, max_tokens: a.output_len, ignore_eos: true, ..SamplingParams::default() };
    let t0 = Instant::now();
    for i in 0..a.requests {
        let mut prompt = shared.clone();
        prompt.extend(tokens(a.input_len - a.shared_prefix_len, 10_000 + i as u64));
        engine.add_request(EngineRequest {
            prompt,
            params: params.clone(),
            n: 1,
            priority: 0,
            cache_salt: None,
            share: Default::default(),
            export_kv: false,
            resumed: 0,
        })?;
    }
    let mut generated = 0usize;
    while engine.has_unfinished() {
        generated += engine.step()?.iter().map(|o| o.token_ids.len()).sum::<usize>();
    }
    let secs = t0.elapsed().as_secs_f64();
    let s = engine.stats();
    let prompt_tokens = a.requests * a.input_len;
    let hit_rate =
        if s.prefix_queried_tokens == 0 { 0.0 } else { s.prefix_hit_tokens as f64 / s.prefix_queried_tokens as f64 };
    // What a perfect cache could serve: the shared prefix of every request but the first,
    // in whole blocks.
    let shareable = (a.requests - 1) * (a.shared_prefix_len / BLOCK * BLOCK);
    let shared_hit_rate = if shareable == 0 { 0.0 } else { s.prefix_hit_tokens as f64 / shareable as f64 };
    let out = serde_json::json!({
        "requests": a.requests,
        "input_len": a.input_len,
        "output_len": a.output_len,
        "shared_prefix_len": a.shared_prefix_len,
        "threads": threads,
        "seconds": secs,
        "requests_per_s": a.requests as f64 / secs,
        "output_tok_s": generated as f64 / secs,
        "total_tok_s": (prompt_tokens + generated) as f64 / secs,
        "kv_waste": s.mean_kv_waste(),
        "prefix_hit_rate": hit_rate,
        "shared_prefix_hit_rate": shared_hit_rate,
        "preemptions": s.preemptions,
        "steps": s.steps,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "offline: {} requests x ({} in, {} out), shared prefix {}, {threads} threads",
            a.requests, a.input_len, a.output_len, a.shared_prefix_len
        );
        println!("  time            {secs:.2} s ({} steps)", s.steps);
        println!("  requests/s      {:.3}", a.requests as f64 / secs);
        println!("  output tok/s    {:.1}", generated as f64 / secs);
        println!("  total tok/s     {:.1}", (prompt_tokens + generated) as f64 / secs);
        println!("  mean KV waste   {:.2}%", 100.0 * s.mean_kv_waste());
        println!(
            "  prefix hit rate {:.1}% of prompt tokens ({:.1}% of the shareable prefix tokens)",
            100.0 * hit_rate,
            100.0 * shared_hit_rate
        );
        println!("  preemptions     {}", s.preemptions);
    }
    Ok(())
}
