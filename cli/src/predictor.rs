//! `tandem predictor train`: fits the router's output-length predictor (`router::predict`)
//! on the model's own answers.
//!
//! It draws a seeded prompt mix (`prompt_mix`), has the model answer every prompt greedily
//! as the serving path would (chat template, EOS honoured, at most `--max-tokens`), keeps
//! the first `1 - --held-out` of them for fitting (ridge regression; its strength chosen
//! on the last fifth of those) and reports Kendall's tau between predicted and actual
//! lengths on the held-out rest. The generations can be saved (`--samples`) and refitted
//! without generating again.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use tandem_engine::generate::{Engine, EngineConfig};
use tandem_engine::llm_engine::EngineRequest;
use tandem_engine::sampling::SamplingParams;
use tandem_engine::scheduler::SchedulerConfig;
use tandem_router::predict::{kendall_tau, LengthPredictor};
use tandem_text::chat::ChatMessage;
use tandem_text::prompt::Prompt;

use crate::prompt_mix::mix;

#[derive(Subcommand, Debug)]
pub enum PredictorCommand {
    /// Generate answers to a prompt mix, fit the predictor, report Kendall's tau held out.
    Train(TrainArgs),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[arg(long, env = "TANDEM_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Prompts to generate answers for.
    #[arg(long, default_value_t = 640)]
    pub prompts: usize,
    /// Seed of the prompt mix (the benchmark's `mixed-length` workload uses others).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Longest answer (as the benchmark's `mixed-length` workload asks).
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Share of the prompts held out for Kendall's tau.
    #[arg(long, default_value_t = 0.25)]
    pub held_out: f64,
    /// Hash buckets of the features.
    #[arg(long, default_value_t = 1024)]
    pub buckets: usize,
    /// Kernel threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// A JSON-lines file of generations: read when it exists (nothing is generated), else
    /// written after generating.
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// Where the fitted predictor goes.
    #[arg(long, default_value = "router/length-predictor.json")]
    pub out: PathBuf,
}

/// One generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sample {
    kind: String,
    prompt: Vec<u32>,
    output_tokens: u32,
}

pub fn run(c: PredictorCommand) -> Result<()> {
    match c {
        PredictorCommand::Train(a) => train(a),
    }
}

fn generate(a: &TrainArgs) -> Result<Vec<Sample>> {
    let mut cfg = EngineConfig {
        model_path: a.model.clone(),
        kv_blocks: Some(4096),
        scheduler: SchedulerConfig { max_seqs: 64, max_waiting: a.prompts.max(1), ..SchedulerConfig::default() },
        ..EngineConfig::default()
    };
    if let Some(t) = a.threads {
        cfg.threads = t;
    }
    let mut engine = Engine::load(&cfg).context("loading the model")?;
    let params = SamplingParams { temperature: 0.0, max_tokens: a.max_tokens, ..SamplingParams::default() };
    let mut samples = BTreeMap::new();
    let mut kinds = BTreeMap::new();
    for p in mix(a.prompts, a.seed) {
        let chat = vec![ChatMessage::new("user", p.user.clone())];
        let ids = engine.prompt_ids(&Prompt::Chat(chat))?;
        let id = engine.engine.add_request(EngineRequest::new(ids.clone(), params.clone()))?;
        kinds.insert(id, (p.kind, ids));
    }
    let t0 = Instant::now();
    let mut counts: BTreeMap<_, u32> = BTreeMap::new();
    let mut done = 0usize;
    while engine.engine.has_unfinished() {
        for o in engine.engine.step()? {
            *counts.entry(o.group).or_default() += o.token_ids.len() as u32;
            if o.finish.is_some() {
                done += 1;
                let (kind, prompt) = kinds.remove(&o.group).expect("each request finishes once");
                samples.insert(o.group, Sample { kind: kind.into(), prompt, output_tokens: counts[&o.group] });
                if done % 64 == 0 {
                    eprintln!("{done}/{} answered ({:.0} s)", a.prompts, t0.elapsed().as_secs_f64());
                }
            }
        }
    }
    Ok(samples.into_values().collect())
}

fn tau_of(p: &LengthPredictor, set: &[(Vec<u32>, u32)]) -> f64 {
    let predicted: Vec<f64> = set.iter().map(|(x, _)| p.score(x)).collect();
    let actual: Vec<f64> = set.iter().map(|(_, y)| *y as f64).collect();
    kendall_tau(&predicted, &actual)
}

fn train(a: TrainArgs) -> Result<()> {
    let samples = match &a.samples {
        Some(path) if path.exists() => std::fs::read_to_string(path)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<Vec<Sample>, _>>()
            .with_context(|| format!("reading {}", path.display()))?,
        _ => {
            let s = generate(&a)?;
            if let Some(path) = &a.samples {
                let mut f = std::fs::File::create(path)?;
                for x in &s {
                    writeln!(f, "{}", serde_json::to_string(x)?)?;
                }
            }
            s
        }
    };
    let data: Vec<(Vec<u32>, u32)> = samples.iter().map(|s| (s.prompt.clone(), s.output_tokens)).collect();
    let cut = ((1.0 - a.held_out.clamp(0.05, 0.9)) * data.len() as f64) as usize;
    let (train, test) = data.split_at(cut);
    // The ridge strength: the best tau on the last fifth of the training prompts.
    let fit_cut = train.len() * 4 / 5;
    let (fit, check) = train.split_at(fit_cut);
    let lambdas = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0];
    let best = lambdas
        .iter()
        .map(|&l| (l, tau_of(&LengthPredictor::fit(fit, a.buckets, l), check)))
        .max_by(|x, y| x.1.total_cmp(&y.1))
        .expect("lambdas");
    let mut p = LengthPredictor::fit(train, a.buckets, best.0);
    p.model = a.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    p.trained_on = train.len();
    p.held_out = test.len();
    p.kendall_tau = tau_of(&p, test);
    p.recipe = format!(
        "tandem predictor train --prompts {} --seed {} --max-tokens {} --held-out {} --buckets {} (ridge lambda {})",
        a.prompts, a.seed, a.max_tokens, a.held_out, a.buckets, best.0
    );
    // Per kind: how long the answers were and what was predicted, held out.
    let mut by_kind: BTreeMap<&str, (usize, f64, f64)> = BTreeMap::new();
    for s in &samples[cut..] {
        let e = by_kind.entry(&s.kind).or_default();
        e.0 += 1;
        e.1 += s.output_tokens as f64;
        e.2 += p.predict(&s.prompt, a.max_tokens as u32) as f64;
    }
    println!("kind        held-out  mean tokens  mean predicted");
    for (k, (n, act, pred)) in &by_kind {
        println!("{k:<11} {n:>8}  {:>11.1}  {:>14.1}", act / *n as f64, pred / *n as f64);
    }
    // A baseline no predictor beats by accident: the prompt's length alone.
    let by_len: Vec<f64> = test.iter().map(|(x, _)| x.len() as f64).collect();
    let actual: Vec<f64> = test.iter().map(|(_, y)| *y as f64).collect();
    println!(
        "Kendall's tau on {} held-out prompts: {:.3} (prompt length alone: {:.3}); fitted on {}, ridge lambda {} \
         (validation tau {:.3})",
        test.len(),
        p.kendall_tau,
        kendall_tau(&by_len, &actual),
        train.len(),
        best.0,
        best.1
    );
    std::fs::write(&a.out, serde_json::to_string(&p)? + "\n").with_context(|| format!("{}", a.out.display()))?;
    println!("wrote {}", a.out.display());
    Ok(())
}
