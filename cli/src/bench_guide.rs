//! `tandem bench guide`: what constrained decoding costs on the engine, for the given model.
//!
//! - Per output token: the same chat prompts generated unconstrained, under a small JSON
//!   Schema and under a large one, one request at a time (greedy); the decode steps' time
//!   per output token (after each request's first) and the mask's cost (the engine's own
//!   timer, over every mask, the first token's included).
//! - Time to first token: a large schema compiled cold (each request a schema not seen
//!   before), the same schema from the cache of compiled guides, and no guide.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};
use tandem_engine::llm_engine::{EngineRequest, LlmEngine, LlmEngineConfig};
use tandem_engine::model::{Model, ModelOptions};
use tandem_engine::sampling::SamplingParams;
use tandem_text::guide::Guide;
use tandem_text::prompt::chat_ids;
use tandem_text::ModelText;

#[derive(Args, Debug)]
pub struct GuideBenchArgs {
    #[arg(long, env = "TANDEM_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Kernel threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Requests per case.
    #[arg(long, default_value_t = 6)]
    pub requests: usize,
    /// Most tokens per request.
    #[arg(long, default_value_t = 96)]
    pub max_tokens: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

const PROMPTS: [&str; 6] = [
    "Describe a fictional person as JSON.",
    "Describe your favourite city as JSON.",
    "Give me a product listing as JSON.",
    "Describe a book you like as JSON.",
    "Describe a pet as JSON.",
    "Plan a short trip as JSON.",
];

fn small_schema() -> Value {
    json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 32},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": false})
}

/// Forty properties: strings, bounded numbers, enums, nested objects and arrays; `salt`
/// names the first property, so each salt is a schema the compiler has not seen.
fn large_schema(salt: &str) -> Value {
    let mut props = serde_json::Map::new();
    props.insert(format!("id_{salt}"), json!({"type": "integer", "minimum": 0, "maximum": 99999}));
    for i in 0..39 {
        let p = match i % 5 {
            0 => json!({"type": "string", "maxLength": 24}),
            1 => json!({"type": "number", "minimum": -1000, "maximum": 1000}),
            2 => json!({"type": "string", "enum": ["low", "medium", "high", "unknown"]}),
            3 => {
                json!({"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "string", "maxLength": 12}},
                        "required": ["a", "b"], "additionalProperties": false})
            }
            _ => json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}),
        };
        props.insert(format!("field_{i}"), p);
    }
    let required: Vec<String> = props.keys().take(3).cloned().collect();
    json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

struct Case {
    tokens: usize,
    seconds: f64,
    mask_seconds: f64,
    masks: u64,
}

/// Runs each prompt alone (`lengths`: each its own `max_tokens` and no EOS, for the
/// unconstrained baseline of the same lengths); counts the decode steps only (after each
/// request's first token), so the prompt's prefill does not dilute the per-token cost.
fn run_case(
    engine: &mut LlmEngine,
    prompts: &[Vec<u32>],
    guide: Option<&Guide>,
    max_tokens: usize,
    lengths: Option<&[usize]>,
) -> Result<(Case, Vec<usize>)> {
    let before = engine.guide_stats;
    let (mut tokens, mut seconds, mut made) = (0, 0.0, Vec::new());
    for (i, p) in prompts.iter().enumerate() {
        let mut params =
            SamplingParams { temperature: 0.0, max_tokens, guide: guide.cloned(), ..SamplingParams::default() };
        if let Some(l) = lengths {
            (params.max_tokens, params.ignore_eos) = (l[i].max(1), true);
        }
        engine.add_request(EngineRequest::new(p.clone(), params))?;
        let (mut first, mut all) = (true, 0);
        while engine.has_unfinished() {
            let t0 = Instant::now();
            let n = engine.step()?.iter().map(|o| o.token_ids.len()).sum::<usize>();
            all += n;
            if !first {
                seconds += t0.elapsed().as_secs_f64();
                tokens += n;
            }
            first &= n == 0;
        }
        made.push(all);
    }
    let after = engine.guide_stats;
    let case = Case {
        tokens,
        seconds,
        mask_seconds: after.mask_seconds - before.mask_seconds,
        masks: after.masks - before.masks,
    };
    Ok((case, made))
}

/// Seconds from submitting a request to its first output token.
fn ttft(engine: &mut LlmEngine, prompt: &[u32], guide: Option<Guide>) -> Result<f64> {
    let params = SamplingParams { temperature: 0.0, max_tokens: 1, guide, ..SamplingParams::default() };
    let t0 = Instant::now();
    engine.add_request(EngineRequest::new(prompt.to_vec(), params))?;
    let mut first = None;
    while engine.has_unfinished() {
        let out = engine.step()?;
        if first.is_none() && out.iter().any(|o| !o.token_ids.is_empty()) {
            first = Some(t0.elapsed().as_secs_f64());
        }
    }
    first.context("no token came")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: GuideBenchArgs) -> Result<()> {
    let mut opts = ModelOptions::default();
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    let (text, model) = ModelText::open_with(&a.model, |f| Model::from_gguf(f, &opts))?;
    let template = text.chat_template.context("the model has no chat template")?;
    let tok = text.tokenizer.clone();
    let threads = model.threads();
    let mut engine = LlmEngine::new(model, text.tokenizer, LlmEngineConfig { kv_blocks: 1024, ..Default::default() })?;
    let prompts: Vec<Vec<u32>> = (0..a.requests)
        .map(|i| {
            let m = [tandem_text::chat::ChatMessage::new("user", PROMPTS[i % PROMPTS.len()])];
            chat_ids(&tok, &template, &m, true).map(|(ids, _)| ids)
        })
        .collect::<Result<_, _>>()?;
    // Build the vocabulary's trie once, outside the timings.
    ttft(&mut engine, &prompts[0], Some(Guide::JsonObject))?;

    let small = Guide::JsonSchema(small_schema());
    let large = Guide::JsonSchema(large_schema("warm"));
    // Each schema's run, and the unconstrained run of the same prompts at the same lengths.
    let mut cases = Vec::new();
    for (name, g) in [("small schema", &small), ("large schema", &large)] {
        let (c, lengths) = run_case(&mut engine, &prompts, Some(g), a.max_tokens, None)?;
        let (base, _) = run_case(&mut engine, &prompts, None, a.max_tokens, Some(&lengths))?;
        cases.push((name, c, base));
    }
    let per_token = |c: &Case| c.seconds / c.tokens.max(1) as f64;

    let n = a.requests.max(3);
    let cold: Vec<f64> = (0..n)
        .map(|i| ttft(&mut engine, &prompts[0], Some(Guide::JsonSchema(large_schema(&format!("cold{i}"))))))
        .collect::<Result<_>>()?;
    let cached: Vec<f64> =
        (0..n).map(|_| ttft(&mut engine, &prompts[0], Some(large.clone()))).collect::<Result<_>>()?;
    let plain: Vec<f64> = (0..n).map(|_| ttft(&mut engine, &prompts[0], None)).collect::<Result<_>>()?;
    let (cold, cached, plain) = (median(cold), median(cached), median(plain));

    let mut rows = Vec::new();
    for (name, c, base) in &cases {
        rows.push(json!({
            "case": name,
            "tokens": c.tokens,
            "ms_per_token": per_token(c) * 1e3,
            "unconstrained_ms_per_token": per_token(base) * 1e3,
            "overhead": per_token(c) / per_token(base),
            "mask_ms_per_token": c.mask_seconds * 1e3 / c.masks.max(1) as f64,
        }));
    }
    let out = json!({
        "model": a.model.display().to_string(),
        "threads": threads,
        "requests": a.requests,
        "constrained": rows,
        "ttft_ms": {"no_guide": plain * 1e3, "large_schema_cold": cold * 1e3, "large_schema_cached": cached * 1e3},
    });
    if a.json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "constrained decoding, {} ({} threads), {} requests per case, greedy",
        a.model.display(),
        threads,
        a.requests
    );
    println!("  each schema against the same prompts unconstrained at the same output lengths (decode steps only)");
    println!(
        "  {:<14} {:>7} {:>12} {:>16} {:>9} {:>14}",
        "case", "tokens", "ms/token", "unconstrained", "overhead", "mask ms/token"
    );
    for (name, c, base) in &cases {
        println!(
            "  {:<14} {:>7} {:>12.2} {:>16.2} {:>8.3}x {:>14.3}",
            name,
            c.tokens,
            per_token(c) * 1e3,
            per_token(base) * 1e3,
            per_token(c) / per_token(base),
            c.mask_seconds * 1e3 / c.masks.max(1) as f64
        );
    }
    println!("time to first token (median of {n}):");
    println!("  no guide                  {:>8.1} ms", plain * 1e3);
    println!("  large schema, compiled    {:>8.1} ms", cold * 1e3);
    println!("  large schema, from cache  {:>8.1} ms", cached * 1e3);
    Ok(())
}
