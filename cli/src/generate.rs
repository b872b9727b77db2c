//! `tandem generate`: flags map one to one onto `EngineConfig` and `SamplingParams`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use tandem_engine::kv_cache::KvDtype;
use tandem_engine::sampling::SamplingParams;
use tandem_engine::{Engine, EngineConfig};
use tandem_kernels::Isa;
use tandem_text::chat::ChatMessage;
use tandem_text::Prompt;

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).multiple(true).args(["prompt", "chat"])))]
pub struct GenerateArgs {
    /// GGUF model file.
    #[arg(long, env = "TANDEM_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Raw prompt, used as is (special tokens in it are parsed). Repeatable: prompts run one
    /// after another and share the prefix cache.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// One user message, rendered with the model's chat template. Repeatable.
    #[arg(long)]
    pub chat: Vec<String>,
    /// Parallel samples per prompt (they share the prompt's KV blocks copy-on-write).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: i64,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling mass; 1 is off.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Keep the K most likely tokens; 0 is off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Drop tokens below this fraction of the top token's probability; 0 is off.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Penalty on tokens already seen; 1 is off.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// PRNG seed: the same seed gives the same output.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Kernel threads (default: all cores).
    #[arg(long, env = "TANDEM_THREADS")]
    pub threads: Option<usize>,
    /// Kernel family: scalar, avx2 or avx512 (default: the best the CPU has).
    #[arg(long)]
    pub isa: Option<String>,
    /// KV cache element type: f16 or f32.
    #[arg(long, default_value = "f16")]
    pub kv_dtype: String,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if a.max_tokens < 1 {
        bail!("--max-tokens must be at least 1, got {}", a.max_tokens);
    }
    if a.n < 1 {
        bail!("--n must be at least 1, got {}", a.n);
    }
    let mut prompts: Vec<Prompt> = a.prompt.iter().map(|p| Prompt::Text(p.clone())).collect();
    prompts.extend(a.chat.iter().map(|c| Prompt::Chat(vec![ChatMessage::new("user", c.clone())])));
    if a.prompt.iter().chain(&a.chat).any(String::is_empty) {
        bail!("the prompt is empty");
    }
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        max_tokens: a.max_tokens as usize,
        stop: a.stop.clone(),
        ..SamplingParams::default()
    };
    let isa = match a.isa.as_deref() {
        None => None,
        Some(s) => Some(Isa::parse(s).with_context(|| format!("unknown --isa {s} (scalar, avx2, avx512)"))?),
    };
    let kv_dtype =
        KvDtype::parse(&a.kv_dtype).with_context(|| format!("unknown --kv-dtype {} (f16, f32)", a.kv_dtype))?;
    let mut cfg = EngineConfig {
        model_path: a.model.clone(),
        isa,
        kv_dtype,
        block_size: a.block_size,
        ..EngineConfig::default()
    };
    if let Some(t) = a.threads {
        cfg.threads = t;
    }
    let mut engine = Engine::load(&cfg)?;
    let stream = !a.json && a.n == 1;
    let mut stdout = std::io::stdout().lock();
    for prompt in &prompts {
        let prompt_ids = engine.prompt_ids(prompt)?;
        let generation = engine.generate(prompt_ids, &params, a.n, |delta| {
            if stream {
                let _ = stdout.write_all(delta.as_bytes());
                let _ = stdout.flush();
            }
        })?;
        if a.json {
            let out = if a.n == 1 {
                let c = &generation.choices[0];
                serde_json::json!({
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "prompt_token_ids": generation.prompt_token_ids,
                    "finish_reason": c.finish_reason.as_str(),
                })
            } else {
                let choices: Vec<_> = generation
                    .choices
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        serde_json::json!({
                            "index": i,
                            "text": c.text,
                            "token_ids": c.token_ids,
                            "finish_reason": c.finish_reason.as_str(),
                        })
                    })
                    .collect();
                serde_json::json!({ "choices": choices, "prompt_token_ids": generation.prompt_token_ids })
            };
            writeln!(stdout, "{out}")?;
        } else if stream {
            writeln!(stdout)?;
        } else {
            for (i, c) in generation.choices.iter().enumerate() {
                writeln!(stdout, "[{i}] {}", c.text)?;
            }
        }
    }
    Ok(())
}
