//! `tandem bench engine`: prefill and decode throughput of the forward pass,
//! in the shape of llama.cpp's `llama-bench` (pp = prompt processing, tg =
//! token generation) so the two can be read side by side.
//!
//! Tokens are fixed pseudo-random ids; sampling is not timed (as in llama-bench).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tandem_engine::kv_cache::{blocks_for_tokens, BlockAllocator, BlockId, KvCache, KvDtype};
use tandem_engine::model::{ForwardBatch, LogitsWanted, Model, ModelOptions, Scratch};
use tandem_kernels::Isa;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Prefill at 128 and 512 tokens; decode at batch 1, 8 and 32 with 256 tokens of context each.
    Engine(EngineBenchArgs),
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
}

const BLOCK: usize = 16;
const PREFILL: [usize; 2] = [128, 512];
const DECODE_BATCH: [usize; 3] = [1, 8, 32];
const DECODE_CONTEXT: usize = 256;

pub fn run(cmd: BenchCommand) -> Result<()> {
    let BenchCommand::Engine(a) = cmd;
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
    for n in PREFILL {
        let v = median((0..reps + 1).map(|_| prefill_once(&model, n)).skip(1).collect())?;
        row(&format!("pp{n}"), v);
        prefill.insert(n.to_string(), v.into());
    }
    let mut decode = serde_json::Map::new();
    for b in DECODE_BATCH {
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
    let mut alloc = BlockAllocator::new(b * per_seq);
    let mut kv = KvCache::new(model.kv_shape(BLOCK), model.config.n_layers, b * per_seq, KvDtype::F16)?;
    let tables: Vec<Vec<BlockId>> = (0..b).map(|_| alloc.allocate(per_seq)).collect::<Result<_, _>>()?;
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
