//! `tandem bench index`: what the router's prefix index costs per request.
//!
//! Fills a `PrefixIndex` as the workers' KV events would (`--workers` workers, each holding
//! `--blocks` blocks: whole prompts of `--prompt-tokens`, each a chain of blocks under one
//! of a few shared prefixes), then times, per request, what `Members::route` adds for the
//! cache: hashing the prompt's blocks, the lookup on every worker, and marking the blocks
//! pending on the chosen one. Half the requests share a cached prefix, half are new.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use tandem_cluster::WorkerId;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_router::index::PrefixIndex;
use tandem_text::prefix::prefix_hashes;

#[derive(Args, Debug)]
pub struct IndexBenchArgs {
    /// Workers in the index.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Cached blocks per worker.
    #[arg(long, default_value_t = 10_000)]
    pub blocks: usize,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Tokens per prompt (cached ones and timed ones).
    #[arg(long, default_value_t = 2048)]
    pub prompt_tokens: usize,
    /// Timed requests.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// A prompt of `n` tokens: `shared` leading tokens from prefix `group`, the rest unique to `id`.
fn prompt(group: u64, id: u64, shared: usize, n: usize) -> Vec<u32> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ group;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if i == shared {
            x ^= id.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push((x % 49_000) as u32 + 100);
    }
    out
}

pub fn run(a: IndexBenchArgs) -> Result<()> {
    if a.workers == 0 || a.block_size == 0 || a.prompt_tokens < a.block_size || a.requests == 0 {
        bail!("--workers, --block-size, --requests must be positive and --prompt-tokens at least a block");
    }
    let per_prompt = a.prompt_tokens / a.block_size;
    let shared = a.prompt_tokens / 2;
    let mut index = PrefixIndex::new();
    let ids: Vec<WorkerId> = (0..a.workers).map(|i| WorkerId::new(format!("w{i}")).expect("a valid id")).collect();
    let fill = Instant::now();
    for (w, id) in ids.iter().enumerate() {
        let snapshot = pb::KvEvent {
            event_id: 1,
            event: Some(pb::kv_event::Event::Snapshot(pb::KvSnapshot { block_hashes: Vec::new(), last: true })),
        };
        index.apply(id, &snapshot).expect("a fresh stream");
        let mut held = 0;
        let mut event_id = 2;
        while held < a.blocks {
            let hashes: Vec<u64> =
                prefix_hashes(&prompt(w as u64 % 4, held as u64, shared, a.prompt_tokens), a.block_size, None)
                    .into_iter()
                    .map(|h| h.0)
                    .collect();
            held += hashes.len();
            let stored = pb::KvStored { parent_hash: None, block_hashes: hashes };
            let ev = pb::KvEvent { event_id, event: Some(pb::kv_event::Event::Stored(stored)) };
            index.apply(id, &ev).expect("in sequence");
            event_id += 1;
        }
    }
    let fill = fill.elapsed();
    let (mut hashing, mut lookup) = (Vec::with_capacity(a.requests), Vec::with_capacity(a.requests));
    let mut hits = 0usize;
    for r in 0..a.requests {
        // Even requests share a cached prefix (group r % 4), odd ones are new.
        let tokens = prompt((r % 4) as u64, 1_000_000 + r as u64, if r % 2 == 0 { shared } else { 0 }, a.prompt_tokens);
        let t0 = Instant::now();
        let hashes: Vec<u64> =
            prefix_hashes(&tokens[..tokens.len() - 1], a.block_size, None).into_iter().map(|h| h.0).collect();
        let t1 = Instant::now();
        let held = index.lookup(&hashes, t1);
        let best = held.iter().max_by_key(|(_, n)| *n).expect("workers");
        hits += usize::from(best.1 > 0);
        index.add_pending(&best.0, &hashes, t1, t1 + Duration::from_secs(2));
        lookup.push(t1.elapsed());
        hashing.push(t1 - t0);
    }
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        let mean = v.iter().sum::<Duration>() / v.len() as u32;
        (mean, v[v.len() / 2], v[(v.len() - 1) * 99 / 100])
    };
    let (hm, h50, h99) = stats(&mut hashing);
    let (lm, l50, l99) = stats(&mut lookup);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "workers": a.workers, "blocks_per_worker": a.blocks, "prompt_blocks": per_prompt,
                "requests": a.requests, "fill_ms": fill.as_secs_f64() * 1e3, "hit_requests": hits,
                "hash_us": {"mean": us(hm), "p50": us(h50), "p99": us(h99)},
                "lookup_us": {"mean": us(lm), "p50": us(l50), "p99": us(l99)},
                "total_mean_us": us(hm + lm),
            })
        );
    } else {
        println!(
            "prefix index: {} workers x {} blocks ({} blocks per prompt; filled in {:.0} ms); {} requests, {} with a cached prefix",
            a.workers,
            a.blocks,
            per_prompt,
            fill.as_secs_f64() * 1e3,
            a.requests,
            hits
        );
        println!("  hash the prompt:        mean {:>8.1} us  p50 {:>8.1} us  p99 {:>8.1} us", us(hm), us(h50), us(h99));
        println!("  lookup + pending:       mean {:>8.1} us  p50 {:>8.1} us  p99 {:>8.1} us", us(lm), us(l50), us(l99));
        println!("  per request, together:  mean {:>8.1} us", us(hm + lm));
    }
    Ok(())
}
