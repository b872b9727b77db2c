//! One loaded model with its tokenizer and chat template, and the
//! single-request generation loop the `tandem generate` command runs.
//!
//! The loop is the simplest client of the batched forward pass: one sequence,
//! its own block table grown a block at a time, blocks returned when it ends
//! (also on error). Serving many requests at once is the scheduler's job.

use std::path::{Path, PathBuf};

use tandem_kernels::Isa;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::EngineError;
use crate::gguf::GgufFile;
use crate::kv_cache::{blocks_for_tokens, BlockAllocator, BlockId, KvCache, KvDtype};
use crate::model::{ForwardBatch, LogitsWanted, Model, ModelOptions, Scratch};
use crate::sampling::{SampledToken, Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

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
        }
    }
}

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Raw text; special tokens in it are parsed as special tokens.
    Text(String),
    /// A conversation, rendered with the model's chat template plus the generation prompt.
    Chat(Vec<ChatMessage>),
    /// Token ids as is.
    Tokens(Vec<u32>),
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    /// Generated ids (EOS excluded).
    pub token_ids: Vec<u32>,
    pub prompt_token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Per generated token, when `logprobs` was asked for.
    pub logprobs: Vec<SampledToken>,
}

/// A model ready to generate.
pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    kv: KvCache,
    alloc: BlockAllocator,
    scratch: Scratch,
    block_size: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("model", &self.model).field("kv_blocks", &self.kv.n_blocks).finish()
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
        let file = GgufFile::open(path)?;
        let model = Model::from_gguf(&file, &ModelOptions { threads: cfg.threads, isa: cfg.isa })?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let chat_template = ChatTemplate::from_gguf(&file)?;
        drop(file);
        let n_blocks = cfg.kv_blocks.unwrap_or_else(|| blocks_for_tokens(model.config.context_length, cfg.block_size));
        let kv = KvCache::new(model.kv_shape(cfg.block_size), model.config.n_layers, n_blocks, cfg.kv_dtype)?;
        Ok(Engine {
            model,
            tokenizer,
            chat_template,
            kv,
            alloc: BlockAllocator::new(n_blocks),
            scratch: Scratch::default(),
            block_size: cfg.block_size,
        })
    }

    /// The prompt as token ids: chat rendered, text tokenized (BOS added only if the model asks).
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let text = match prompt {
            Prompt::Tokens(ids) => return Ok(ids.clone()),
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(messages) => {
                let tpl = self
                    .chat_template
                    .as_ref()
                    .ok_or_else(|| EngineError::InvalidRequest("this model has no chat template".into()))?;
                tpl.render(messages, true)?
            }
        };
        let mut ids = Vec::new();
        if self.tokenizer.add_bos() {
            ids.extend(self.tokenizer.bos_id());
        }
        ids.extend(self.tokenizer.encode(&text, true)?);
        Ok(ids)
    }

    /// Free KV blocks (all of them between requests: nothing leaks).
    pub fn free_blocks(&self) -> usize {
        self.alloc.n_free()
    }

    /// Generates from `prompt_ids`; `on_text` receives text deltas as they become final.
    pub fn generate(
        &mut self,
        prompt_ids: Vec<u32>,
        params: &SamplingParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation, EngineError> {
        let ctx = self.model.config.context_length;
        params.validate(self.model.config.vocab_size)?;
        if prompt_ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if prompt_ids.len() >= ctx {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens; the model's context is {ctx} tokens",
                prompt_ids.len()
            )));
        }
        if let Some(&bad) = prompt_ids.iter().find(|&&t| t as usize >= self.model.config.vocab_size) {
            return Err(EngineError::InvalidRequest(format!("token id {bad} is outside the vocabulary")));
        }
        let mut table: Vec<BlockId> = Vec::new();
        let result = self.run(&prompt_ids, params, &mut table, &mut on_text);
        self.alloc.release(&table);
        let (token_ids, finish_reason, text, logprobs) = result?;
        Ok(Generation { text, token_ids, prompt_token_ids: prompt_ids, finish_reason, logprobs })
    }

    #[allow(clippy::type_complexity)]
    fn run(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        table: &mut Vec<BlockId>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(Vec<u32>, FinishReason, String, Vec<SampledToken>), EngineError> {
        let vocab = self.model.config.vocab_size;
        let ctx = self.model.config.context_length;
        let eos = self.tokenizer.eos_id();
        let mut sampler = Sampler::new(params);
        let mut decoder = IncrementalDecoder::new(true);
        let mut stops = StopMatcher::new(&params.stop);
        let mut generated: Vec<u32> = Vec::new();
        let mut logprobs = Vec::new();
        let mut text = String::new();
        let mut pending: &[u32] = prompt;
        let mut last = [0u32; 1];
        let mut pos = 0usize;
        let finish = loop {
            let need = blocks_for_tokens(pos + pending.len(), self.block_size);
            if need > table.len() {
                table.extend(self.alloc.allocate(need - table.len())?);
            }
            let mut batch = ForwardBatch::default();
            let s = batch.add_seq(table);
            batch.add_tokens(s, pending, pos, LogitsWanted::Last);
            let logits = self.model.forward(&batch, &mut self.kv, &mut self.scratch)?;
            pos += pending.len();
            let tok = sampler.sample(&logits[..vocab], prompt, &generated);
            let id = tok.id;
            if params.logprobs.is_some() {
                logprobs.push(tok);
            }
            if (!params.ignore_eos && Some(id) == eos) || params.stop_token_ids.contains(&id) {
                break FinishReason::Stop;
            }
            generated.push(id);
            let delta = decoder.push(&self.tokenizer, id)?;
            let out = stops.push(&delta);
            text.push_str(&out.text);
            on_text(&out.text);
            if out.is_stop() {
                break FinishReason::Stop;
            }
            if generated.len() >= params.max_tokens || pos + 1 >= ctx {
                break FinishReason::Length;
            }
            last[0] = id;
            pending = &last;
        };
        if finish == FinishReason::Length || !stops.is_stopped() {
            let tail = decoder.finish();
            let mut out = stops.push(&tail).text;
            if !stops.is_stopped() {
                out.push_str(&stops.finish());
            }
            text.push_str(&out);
            on_text(&out);
        }
        Ok((generated, finish, text, logprobs))
    }
}
