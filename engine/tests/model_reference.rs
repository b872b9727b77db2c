//! The forward pass against llama.cpp (flash attention off), for each model, using the
//! fixtures in `tests/fixtures/llama_cpp/` made by `scripts/make-fixtures.py`
//! (`reference.json`: SmolLM2-135M, Q4_1, `llama`; `qwen2.5-coder-0.5b.json`:
//! Qwen2.5-Coder-0.5B, Q4_K_M, `qwen2`).

mod llama_cpp;

use llama_cpp::{fixture_named, ids, model_path, top5, Tally, Top5Bounds, Top5Comparison, QWEN_TOP5, SMOLLM2_TOP5};
use tandem_engine::kv_cache::{blocks_for_tokens, BlockId, KvCache, KvDtype};
use tandem_engine::model::{ForwardBatch, LogitsWanted, Model, ModelOptions, Scratch};

/// A model, its fixture and how close to llama.cpp it must be.
struct Reference {
    model: &'static str,
    fixture: &'static str,
    /// |our logit - llama.cpp's| at llama.cpp's top-1 token: per position, and its mean.
    top1_worst: f64,
    top1_mean: f64,
    /// The mean of the signed difference, either way: what catches a constant offset, which
    /// the top-5 comparison cannot see.
    top1_bias: f64,
    top5: Top5Bounds,
}

// As for the top-5 bounds, per-position and mean bounds are about twice what was measured (on
// a 2-vCPU AVX-512 machine): rounding alone moves these models' logits by up to ~1.4
// (docs/perf.md, "Correctness").
const SMOLLM2: Reference = Reference {
    model: "SmolLM2-135M-Instruct.Q4_1.gguf",
    fixture: "reference.json",
    // Measured over all 1,517 positions: worst 1.385 (french-greeting, position 28).
    top1_worst: 3.0,
    // Measured: 0.168. Logits times 1.02 make it 0.49 (llama.cpp's top-1 logits average 24.7).
    top1_mean: 0.35,
    // Measured: -0.015; an offset of 0.1 in our logits makes it +0.085 or -0.115.
    top1_bias: 0.05,
    top5: SMOLLM2_TOP5,
};

const QWEN: Reference = Reference {
    model: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    fixture: "qwen2.5-coder-0.5b.json",
    top1_worst: QWEN_TOP1_WORST,
    top1_mean: QWEN_TOP1_MEAN,
    top1_bias: QWEN_TOP1_BIAS,
    top5: QWEN_TOP5,
};

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

fn model(r: &Reference) -> Model {
    Model::load(&model_path(r.model), &ModelOptions::default()).expect("model loads")
}

/// Teacher forcing: feed prompt + llama.cpp's generation in one batch and
/// compare our logits with llama.cpp's at every position: the argmax, the
/// logit at llama.cpp's top-1 token, and the distribution over its top 5.
#[test]
fn teacher_forced_logits_agree_with_llama_cpp() {
    teacher_forced(&SMOLLM2);
}

#[test]
fn qwen_teacher_forced_logits_agree_with_llama_cpp() {
    teacher_forced(&QWEN);
}

fn teacher_forced(r: &Reference) {
    let m = model(r);
    let fx = fixture_named(r.fixture);
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
    top1.check(r.top1_worst, r.top1_mean);
    let bias = bias / total as f64;
    eprintln!("mean of (our logit - llama.cpp's) at its top-1: {bias:+.4}");
    assert!(bias.abs() <= r.top1_bias, "our logits are offset from llama.cpp's by {bias:+.4} on average");
    dist.check_within(&r.top5);
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
    greedy(&SMOLLM2);
}

#[test]
fn qwen_greedy_generation_matches_llama_cpp_up_to_first_near_tie() {
    greedy(&QWEN);
}

fn greedy(r: &Reference) {
    let m = model(r);
    let fx = fixture_named(r.fixture);
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

// Qwen2.5-Coder-0.5B (Q4_K_M) bounds: about twice what was measured over all 1,532 positions.
/// Measured: worst 0.369 (german-weather, position 30).
const QWEN_TOP1_WORST: f64 = 0.8;
/// Measured: 0.060.
const QWEN_TOP1_MEAN: f64 = 0.12;
/// Measured: +0.0044; an offset of 0.05 in our logits would show.
const QWEN_TOP1_BIAS: f64 = 0.02;
