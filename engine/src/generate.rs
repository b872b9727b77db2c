//! One loaded model with its tokenizer and chat template, and a blocking
//! "generate this prompt" call on top of the engine loop (what the
//! `tandem generate` command runs). Prompts generated one after another share
//! the prefix cache.

use std::path::{Path, PathBuf};

use tandem_kernels::Isa;

use tandem_text::chat::ChatTemplate;
use tandem_text::prompt::{prompt_ids, Prompt};
use tandem_text::tokenizer::Tokenizer;
use tandem_text::ModelText;

use crate::error::EngineError;
use crate::finish::FinishReason;
use crate::kv_cache::{blocks_for_tokens, KvDtype};
use crate::llm_engine::{EngineRequest, LlmEngine, LlmEngineConfig};
use crate::model::{Model, ModelOptions};
use crate::sampling::{SampledToken, SamplingParams};
use crate::scheduler::SchedulerConfig;

/// Settings for loading an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    /// Kernel threads.
    pub threads: usize,
    /// Kernel family; `None` = the best the CPU has.
    pub isa: Option<Isa>,
    /// Tokens per KV block.
    pub block_size: usize,
    pub kv_dtype: KvDtype,
    /// KV blocks in the pool; `None` = enough for one sequence of the full context.
    pub kv_blocks: Option<usize>,
    pub prefix_caching: bool,
    pub scheduler: SchedulerConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            model_path: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            threads: ModelOptions::default().threads,
            isa: None,
            block_size: 16,
            kv_dtype: KvDtype::F16,
            kv_blocks: None,
            prefix_caching: true,
            scheduler: SchedulerConfig::default(),
        }
    }
}

/// One finished sequence of a generation.
#[derive(Debug, Clone)]
pub struct Choice {
    pub text: String,
    /// Generated ids (EOS excluded).
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Per generated token, when `logprobs` was asked for.
    pub logprobs: Vec<SampledToken>,
}

/// A finished generation: `n` choices for one prompt.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_token_ids: Vec<u32>,
    pub choices: Vec<Choice>,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// A model ready to generate: the engine loop plus the chat template.
pub struct Engine {
    pub engine: LlmEngine,
    pub chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("model", &self.engine.model).finish()
    }
}

impl Engine {
    pub fn load(cfg: &EngineConfig) -> Result<Engine, EngineError> {
        if cfg.block_size == 0 || cfg.block_size > 1024 {
            return Err(EngineError::InvalidRequest(format!("block size must be in 1..=1024, got {}", cfg.block_size)));
        }
        let path: &Path = &cfg.model_path;
        if !path.exists() {
            return Err(EngineError::Io(format!(
                "model file {} does not exist (run scripts/fetch-model.sh to fetch the default model)",
                path.display()
            )));
        }
        let opts = ModelOptions { threads: cfg.threads, isa: cfg.isa };
        let (text, model) = ModelText::open_with(path, |file| Model::from_gguf(file, &opts))?;
        let ctx = model.config.context_length;
        let kv_blocks = cfg.kv_blocks.unwrap_or_else(|| blocks_for_tokens(ctx, cfg.block_size));
        let lcfg = LlmEngineConfig {
            scheduler: SchedulerConfig { max_model_len: ctx, ..cfg.scheduler.clone() },
            block_size: cfg.block_size,
            kv_blocks,
            kv_dtype: cfg.kv_dtype,
            prefix_caching: cfg.prefix_caching,
        };
        Ok(Engine { engine: LlmEngine::new(model, text.tokenizer, lcfg)?, chat_template: text.chat_template })
    }

    pub fn model(&self) -> &Model {
        &self.engine.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.engine.tokenizer
    }

    /// The prompt as token ids: chat rendered, text tokenized (BOS added only if the model asks).
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        Ok(prompt_ids(self.tokenizer(), self.chat_template.as_ref(), prompt)?)
    }

    /// Free KV blocks, counting cached prefix blocks nobody holds (all of them between requests).
    pub fn free_blocks(&self) -> usize {
        self.engine.scheduler.blocks.n_free()
    }

    /// Generates `n` choices from `prompt_ids`; `on_text` receives choice 0's text deltas.
    pub fn generate(
        &mut self,
        prompt_ids: Vec<u32>,
        params: &SamplingParams,
        n: usize,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation, EngineError> {
        let ctx = self.model().config.context_length;
        if prompt_ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if prompt_ids.len() >= ctx {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens; the model's context is {ctx} tokens",
                prompt_ids.len()
            )));
        }
        let req = EngineRequest {
            prompt: prompt_ids.clone(),
            params: params.clone(),
            n,
            priority: 0,
            cache_salt: None,
            share: Default::default(),
            export_kv: false,
            resumed: 0,
        };
        let group = self.engine.add_request(req)?;
        let mut choices: Vec<Option<Choice>> = vec![None; n];
        let mut partial: Vec<Choice> = (0..n)
            .map(|_| Choice {
                text: String::new(),
                token_ids: Vec::new(),
                finish_reason: FinishReason::Length,
                logprobs: Vec::new(),
            })
            .collect();
        let mut cached_tokens = 0;
        // Steps in a row that scheduled nothing: the scheduler is stuck (a bug), not slow.
        let mut idle_steps = 0;
        while choices.iter().any(Option::is_none) {
            let before = self.engine.stats().scheduled_tokens;
            let outs = match self.engine.step() {
                Ok(o) => o,
                Err(e) => {
                    self.engine.abort(group);
                    return Err(e);
                }
            };
            if outs.is_empty() && !self.engine.has_unfinished() {
                return Err(EngineError::InvalidRequest("the request ended without output".into()));
            }
            idle_steps = if self.engine.stats().scheduled_tokens == before { idle_steps + 1 } else { 0 };
            if idle_steps > 100 {
                self.engine.abort(group);
                return Err(EngineError::OutOfBlocks("the scheduler made no progress for 100 steps".into()));
            }
            for o in outs.into_iter().filter(|o| o.group == group) {
                cached_tokens = cached_tokens.max(o.cached_tokens);
                if o.index == 0 && !o.text.is_empty() {
                    on_text(&o.text);
                }
                let c = &mut partial[o.index];
                c.text.push_str(&o.text);
                c.token_ids.extend(&o.token_ids);
                c.logprobs.extend(o.logprobs);
                if let Some(f) = o.finish {
                    c.finish_reason = f;
                    choices[o.index] = Some(c.clone());
                }
            }
        }
        Ok(Generation { prompt_token_ids: prompt_ids, choices: choices.into_iter().flatten().collect(), cached_tokens })
    }
}
