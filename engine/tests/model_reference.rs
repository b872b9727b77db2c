//! The forward pass against llama.cpp (flash attention off), using the
//! fixtures in `tests/fixtures/llama_cpp/reference.json` made by
//! `scripts/make-fixtures.py`.

mod llama_cpp;

use std::path::PathBuf;

use llama_cpp::{fixture, ids, top5, Tally, Top5Comparison};
use tandem_engine::kv_cache::{blocks_for_tokens, BlockId, KvCache, KvDtype};
use tandem_engine::model::{ForwardBatch, LogitsWanted, Model, ModelOptions, Scratch};

fn model() -> Model {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "model missing: run scripts/fetch-model.sh first ({})", path.display());
    Model::load(&path, &ModelOptions::default()).expect("model loads")
}

// Bounds on |our logit - llama.cpp's| at llama.cpp's top-1 token, from all 1,517
// positions (on a 2-vCPU AVX-512 machine). As for the top-5 bounds (`llama_cpp/mod.rs`),
// per-position and mean bounds are about twice what was measured: rounding alone moves
// this model's logits by up to ~1.4 (docs/perf.md, "Correctness"). The mean of the signed
// difference is what catches a constant offset, which the top-5 comparison cannot see.
/// Per position. Measured: worst 1.385 (french-greeting, position 28).
const TOP1_WORST: f64 = 3.0;
/// The mean of the absolute difference. Measured: 0.168. Logits times 1.02 make it 0.49
/// (llama.cpp's top-1 logits average 24.7).
const TOP1_MEAN: f64 = 0.35;
/// The mean of the signed difference, either way. Measured: -0.015; an offset of 0.1 in
/// our logits makes it +0.085 or -0.115.
const TOP1_BIAS: f64 = 0.05;

/// A top-2 logit gap above which a disagreement is not rounding noise.
const DECISIVE_GAP: f32 = 0.5;
/// Below this top-2 gap, taking llama.cpp's second choice is rounding noise.
const NEAR_TIE: f32 = 0.5;

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Teacher forcing: feed prompt + llama.cpp's generation in one batch and
/// compare our logits with llama.cpp's at every position: the argmax, the
/// logit at llama.cpp's top-1 token, and the distribution over its top 5.
#[test]
fn teacher_forced_logits_agree_with_llama_cpp() {
    let m = model();
    let fx = fixture();
    let bs = 16;
    let (mut agree, mut total) = (0usize, 0usize);
    let (mut decisive_agree, mut decisive_total) = (0usize, 0usize);
    let mut top1 = Tally::new("logit at llama.cpp's top-1 - llama.cpp's");
    let mut bias = 0f64;
    let mut dist = Top5Comparison::new();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mut seq = ids(&case["prompt_token_ids"]);
        seq.extend(ids(&case["generated_token_ids"]));
        let n = seq.len();
        let mut kv = KvCache::new(m.kv_shape(bs), m.config.n_layers, blocks_for_tokens(n, bs), KvDtype::F16).unwrap();
        // A scrambled block table: pages need not be contiguous.
        let table: Vec<BlockId> = (0..kv.n_blocks as u32).rev().map(BlockId).collect();
        let mut batch = ForwardBatch::default();
        let s = batch.add_seq(&table);
        batch.add_tokens(s, &seq, 0, LogitsWanted::All);
        let mut scratch = Scratch::default();
        let logits = m.forward(&batch, &mut kv, &mut scratch).unwrap();
        let v = m.config.vocab_size;
        for p in 0..n {
            let row = &logits[p * v..(p + 1) * v];
            let want = top5(case, p);
            let (want_id, want_logit) = want[0];
            let gap = want_logit - want[1].1;
            let got = argmax(row);
            total += 1;
            if got == want_id {
                agree += 1;
            } else {
                eprintln!("{name}: position {p}: ours {got}, llama.cpp {want_id} (its top-2 logit gap {gap:.4})");
            }
            if gap >= DECISIVE_GAP {
                decisive_total += 1;
                decisive_agree += usize::from(got == want_id);
            }
            let at = format!("{name}, position {p}");
            let diff = (row[want_id as usize] - want_logit) as f64;
            top1.add(diff, &at);
            bias += diff;
            dist.add(&want, |id| row[id as usize] as f64, &at);
        }
    }
    let rate = agree as f64 / total as f64;
    let decisive = decisive_agree as f64 / decisive_total as f64;
    eprintln!(
        "argmax agreement {agree}/{total} = {rate:.4}; where llama.cpp's top-2 gap >= {DECISIVE_GAP}: \
         {decisive_agree}/{decisive_total} = {decisive:.4}"
    );
    // llama.cpp disagrees with itself at this level: its batched and one-token-at-a-time
    // evaluations of the same tokens agree on ~98% of argmaxes (docs/perf.md, "Correctness").
    assert!(rate >= 0.96, "argmax agreement {rate:.4} below 0.96");
    assert!(decisive >= 0.995, "argmax agreement {decisive:.4} below 0.995 where llama.cpp is decisive");
    top1.check(TOP1_WORST, TOP1_MEAN);
    let bias = bias / total as f64;
    eprintln!("mean of (our logit - llama.cpp's) at its top-1: {bias:+.4}");
    assert!(bias.abs() <= TOP1_BIAS, "our logits are offset from llama.cpp's by {bias:+.4} on average");
    dist.check();
}

/// Greedy generation, one token at a time through the paged cache, matches
/// llama.cpp token for token; where it differs, llama.cpp rated our token
/// within a near-tie of its own pick, and the comparison stops there (the
/// texts legitimately diverge after it). Most cases must match in full.
///
/// A near-tie here is a gap under 0.5 logits, not 0.1: llama.cpp's batched
/// and token-by-token evaluations of the same tokens differ by up to ~1.4
/// logits on this model (docs/perf.md, "Correctness").
#[test]
fn greedy_generation_matches_llama_cpp_up_to_first_near_tie() {
    let m = model();
    let fx = fixture();
    let bs = 16;
    let v = m.config.vocab_size;
    let mut diverged = 0;
    let cases = fx["cases"].as_array().unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["prompt_token_ids"]);
        let want = ids(&case["generated_token_ids"]);
        let total = prompt.len() + want.len() + 1;
        // Odd blocks only, so this sequence's blocks are not contiguous; the table grows a
        // block at a time, as generation needs it.
        let n_blocks = blocks_for_tokens(total, bs);
        let mut kv = KvCache::new(m.kv_shape(bs), m.config.n_layers, 2 * n_blocks, KvDtype::F16).unwrap();
        let mut table: Vec<BlockId> = Vec::new();
        let ensure = |table: &mut Vec<BlockId>, len: usize| {
            while table.len() < blocks_for_tokens(len, bs) {
                table.push(BlockId(2 * table.len() as u32 + 1));
            }
        };
        let mut scratch = Scratch::default();
        ensure(&mut table, prompt.len());
        let mut batch = ForwardBatch::default();
        let s = batch.add_seq(&table);
        batch.add_tokens(s, &prompt, 0, LogitsWanted::Last);
        let mut next = argmax(&m.forward(&batch, &mut kv, &mut scratch).unwrap()[..v]);
        let mut pos = prompt.len();
        for (step, &w) in want.iter().enumerate() {
            if next != w {
                // Diverging is allowed only where llama.cpp itself rated our token
                // within NEAR_TIE logits of its best.
                let row = top5(case, prompt.len() - 1 + step);
                let behind = row.iter().find(|e| e.0 == next).map(|e| row[0].1 - e.1);
                assert!(
                    behind.is_some_and(|b| b < NEAR_TIE),
                    "{name}: step {step}: ours {next}, llama.cpp {w}; llama.cpp rates ours {behind:?} logits behind"
                );
                eprintln!(
                    "{name}: matched {step} tokens, then a near-tie: ours is {:.3} logits behind llama.cpp's pick",
                    behind.unwrap()
                );
                diverged += 1;
                break;
            }
            if step + 1 == want.len() {
                eprintln!("{name}: matched all {} tokens", want.len());
                break;
            }
            ensure(&mut table, pos + 1);
            let mut batch = ForwardBatch::default();
            let s = batch.add_seq(&table);
            batch.add_tokens(s, &[w], pos, LogitsWanted::Last);
            next = argmax(&m.forward(&batch, &mut kv, &mut scratch).unwrap()[..v]);
            pos += 1;
        }
    }
    eprintln!("{} of {} cases diverged from llama.cpp, each at a near-tie", diverged, cases.len());
}
