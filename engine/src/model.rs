//! The model: weights in the compute layout and the batched forward pass.
//!
//! One forward pass serves every architecture in [`tandem_text::config::ARCHITECTURES`]:
//! Llama's shape (pre-norm blocks, RMSNorm, grouped-query attention, SwiGLU) with the few
//! things an [`ArchSpec`](tandem_text::config::ArchSpec) says differ, such as Qwen2's Q/K/V
//! biases and its rotary pairing. Output weights are the file's own `output.weight` or,
//! when it has none, the tied embedding.
//!
//! One `forward` call takes a flat batch of tokens drawn from many sequences
//! (prefill chunks and decode tokens alike), each with its position and its
//! sequence's block table, writes their K/V into the paged cache, and returns
//! logits for the tokens asked for. The model owns no KV memory and keeps no
//! per-sequence state: that is the caller's (the scheduler's) business.

use std::path::Path;

use tandem_kernels::attention::{attend, write_kv, AttendArgs};
use tandem_kernels::matmul::matmul;
use tandem_kernels::ops::{add_in_place, rms_norm, swiglu_isa, RopeTable};
use tandem_kernels::pool::{split_range, SyncPtr};
use tandem_kernels::quant::dequantize_row;
use tandem_kernels::{GgmlType, Isa, KvElem, KvShape, QuantizedActs, ThreadPool, Weights};
use tandem_text::config::{ModelConfig, RopeStyle};
use tandem_text::gguf::{GgufFile, TensorInfo};

use crate::error::EngineError;
use crate::kv_cache::{BlockId, KvCache, KvStorage, LayerKv, LayerKvBytes};

/// How the model runs.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Kernel threads (including the caller's).
    pub threads: usize,
    /// Kernel family; `None` picks the best the CPU has.
    pub isa: Option<Isa>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        ModelOptions { threads, isa: None }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Weights,
    wk: Weights,
    wv: Weights,
    wo: Weights,
    /// Q, K, V biases (Qwen2); `None` for architectures without them.
    qkv_bias: Option<[Vec<f32>; 3]>,
    ffn_norm: Vec<f32>,
    w_gate: Weights,
    w_up: Weights,
    w_down: Weights,
}

/// A loaded model, ready to run.
pub struct Model {
    pub config: ModelConfig,
    embed: Weights,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `None`: logits use the (tied) embedding matrix.
    output: Option<Weights>,
    rope: RopeTable,
    isa: Isa,
    pool: ThreadPool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("config", &self.config).field("isa", &self.isa).finish()
    }
}

/// One sequence's view for a forward call.
#[derive(Debug, Clone, Copy)]
pub struct SeqRef<'a> {
    pub block_table: &'a [BlockId],
}

/// A flat batch of tokens from several sequences.
#[derive(Debug, Clone, Default)]
pub struct ForwardBatch<'a> {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// For each token, its index into `seqs`.
    pub seq_of: Vec<u32>,
    pub seqs: Vec<SeqRef<'a>>,
    /// Indices of tokens whose logits are wanted, in the order they are returned.
    pub logits_for: Vec<u32>,
}

impl<'a> ForwardBatch<'a> {
    /// Adds a sequence; returns its index.
    pub fn add_seq(&mut self, block_table: &'a [BlockId]) -> u32 {
        self.seqs.push(SeqRef { block_table });
        (self.seqs.len() - 1) as u32
    }

    /// Adds consecutive tokens of sequence `seq` starting at `start_pos`.
    pub fn add_tokens(&mut self, seq: u32, tokens: &[u32], start_pos: usize, logits: LogitsWanted) {
        let first = self.tokens.len();
        for (i, &t) in tokens.iter().enumerate() {
            self.tokens.push(t);
            self.positions.push((start_pos + i) as u32);
            self.seq_of.push(seq);
        }
        match logits {
            LogitsWanted::None => {}
            LogitsWanted::Last => {
                if !tokens.is_empty() {
                    self.logits_for.push((first + tokens.len() - 1) as u32)
                }
            }
            LogitsWanted::All => self.logits_for.extend((first..first + tokens.len()).map(|i| i as u32)),
        }
    }
}

/// Which of a run of tokens need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    Last,
    All,
}

/// Reusable per-call buffers, grown on demand.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    xq: QuantizedActs,
    pub logits: Vec<f32>,
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

impl Model {
    /// Loads a GGUF model from `path`.
    pub fn load(path: &Path, opts: &ModelOptions) -> Result<Model, EngineError> {
        let file = GgufFile::open(path)?;
        Self::from_gguf(&file, opts)
    }

    pub fn from_gguf(f: &GgufFile, opts: &ModelOptions) -> Result<Model, EngineError> {
        let cfg = ModelConfig::from_gguf(f)?;
        let h = cfg.hidden;
        let q_dim = cfg.n_heads * cfg.head_dim;
        let kv_dim = cfg.n_kv_heads * cfg.head_dim;
        let embed = load_matrix(f, "token_embd.weight", cfg.vocab_size, h)?;
        let output = match f.tensor("output.weight") {
            Some(_) => Some(load_matrix(f, "output.weight", cfg.vocab_size, h)?),
            None => None,
        };
        let output_norm = load_vector(f, "output_norm.weight", h)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let bias = |s: &str, len| load_vector(f, &format!("blk.{i}.{s}.bias"), len);
            let qkv_bias = match cfg.arch.qkv_bias {
                true => Some([bias("attn_q", q_dim)?, bias("attn_k", kv_dim)?, bias("attn_v", kv_dim)?]),
                false => None,
            };
            layers.push(Layer {
                attn_norm: load_vector(f, &n("attn_norm"), h)?,
                wq: load_matrix(f, &n("attn_q"), q_dim, h)?,
                wk: load_matrix(f, &n("attn_k"), kv_dim, h)?,
                wv: load_matrix(f, &n("attn_v"), kv_dim, h)?,
                wo: load_matrix(f, &n("attn_output"), h, q_dim)?,
                qkv_bias,
                ffn_norm: load_vector(f, &n("ffn_norm"), h)?,
                w_gate: load_matrix(f, &n("ffn_gate"), cfg.ffn, h)?,
                w_up: load_matrix(f, &n("ffn_up"), cfg.ffn, h)?,
                w_down: load_matrix(f, &n("ffn_down"), h, cfg.ffn)?,
            });
        }
        let rope = RopeTable::new(cfg.head_dim, cfg.rope_theta, cfg.context_length);
        let isa = opts.isa.map(Isa::or_best).unwrap_or_else(Isa::detect);
        Ok(Model { config: cfg, embed, layers, output_norm, output, rope, isa, pool: ThreadPool::new(opts.threads) })
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// The KV layout for a given block size.
    pub fn kv_shape(&self, block_size: usize) -> KvShape {
        KvShape { block_size, n_kv_heads: self.config.n_kv_heads, head_dim: self.config.head_dim }
    }

    /// Bytes of weights in memory.
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed.nbytes() + self.output.as_ref().map_or(0, Weights::nbytes);
        for l in &self.layers {
            n += [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down].iter().map(|w| w.nbytes()).sum::<usize>();
        }
        n
    }

    /// Runs the batch; returns `logits_for.len()` rows of `vocab_size` logits (in `scratch.logits`).
    pub fn forward<'s>(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvCache,
        scratch: &'s mut Scratch,
    ) -> Result<&'s [f32], EngineError> {
        self.forward_with_hook(batch, kv, scratch, &mut |_, _| {})
    }

    /// Like `forward`, calling `on_layer(layer, kv)` as soon as each layer's K and V for this
    /// batch are in the cache (before that layer's attention), so a prefill worker can ship
    /// layer L while layer L+1 computes.
    pub fn forward_with_hook<'s>(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvCache,
        scratch: &'s mut Scratch,
        on_layer: &mut dyn FnMut(usize, LayerKvBytes<'_>),
    ) -> Result<&'s [f32], EngineError> {
        self.validate(batch, kv)?;
        match &mut kv.storage {
            KvStorage::F16(l) => self.forward_typed(batch, kv.shape, l, scratch, on_layer),
            KvStorage::F32(l) => self.forward_typed(batch, kv.shape, l, scratch, on_layer),
        }
        Ok(&scratch.logits[..batch.logits_for.len() * self.config.vocab_size])
    }

    fn validate(&self, b: &ForwardBatch<'_>, kv: &KvCache) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        let n = b.tokens.len();
        if n == 0 {
            return bad("empty batch".into());
        }
        if b.positions.len() != n || b.seq_of.len() != n {
            return bad("batch arrays differ in length".into());
        }
        if kv.shape != self.kv_shape(kv.shape.block_size) || kv.n_layers != self.config.n_layers {
            return bad("KV cache shape does not match the model".into());
        }
        for s in &b.seqs {
            if let Some(id) = s.block_table.iter().find(|id| id.0 as usize >= kv.n_blocks) {
                return bad(format!("block {} outside a pool of {}", id.0, kv.n_blocks));
            }
        }
        for i in 0..n {
            if b.tokens[i] as usize >= self.config.vocab_size {
                return bad(format!("token id {} outside the vocabulary", b.tokens[i]));
            }
            let pos = b.positions[i] as usize;
            if pos >= self.config.context_length {
                return bad(format!("position {pos} beyond the context length {}", self.config.context_length));
            }
            let Some(seq) = b.seqs.get(b.seq_of[i] as usize) else {
                return bad(format!("token {i} names sequence {} of {}", b.seq_of[i], b.seqs.len()));
            };
            if pos / kv.shape.block_size >= seq.block_table.len() {
                return bad(format!("position {pos} has no block in its sequence's block table"));
            }
        }
        if let Some(&i) = b.logits_for.iter().find(|&&i| i as usize >= n) {
            return bad(format!("logits asked for token {i} of {n}"));
        }
        Ok(())
    }

    fn forward_typed<E: KvElem>(
        &self,
        b: &ForwardBatch<'_>,
        shape: KvShape,
        kv: &mut [LayerKv<E>],
        s: &mut Scratch,
        on_layer: &mut dyn FnMut(usize, LayerKvBytes<'_>),
    ) {
        let cfg = &self.config;
        let (n, h, hd) = (b.tokens.len(), cfg.hidden, cfg.head_dim);
        let (q_dim, kv_dim, group) = (cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.group());
        let pool = &self.pool;
        let isa = self.isa;
        for buf in [&mut s.x, &mut s.xn, &mut s.tmp] {
            grow(buf, n * h);
        }
        grow(&mut s.q, n * q_dim);
        grow(&mut s.attn, n * q_dim);
        grow(&mut s.k, n * kv_dim);
        grow(&mut s.v, n * kv_dim);
        grow(&mut s.gate, n * cfg.ffn);
        grow(&mut s.up, n * cfg.ffn);

        for (t, &tok) in b.tokens.iter().enumerate() {
            self.embed.dequantize_row(tok as usize, &mut s.x[t * h..(t + 1) * h]);
        }
        let max_ctx = b.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(1);
        let scale = 1.0 / (hd as f32).sqrt();

        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            self.norm_rows(&s.x, &layer.attn_norm, &mut s.xn, n);
            s.xq.quantize(pool, isa, &s.xn, n, h);
            matmul(pool, isa, &layer.wq, &s.xn, &s.xq, n, &mut s.q);
            matmul(pool, isa, &layer.wk, &s.xn, &s.xq, n, &mut s.k);
            matmul(pool, isa, &layer.wv, &s.xn, &s.xq, n, &mut s.v);
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                add_rows(&mut s.q[..n * q_dim], bq);
                add_rows(&mut s.k[..n * kv_dim], bk);
                add_rows(&mut s.v[..n * kv_dim], bv);
            }
            let cache = &mut kv[li];
            for t in 0..n {
                let pos = b.positions[t] as usize;
                let (q, k) = (&mut s.q[t * q_dim..(t + 1) * q_dim], &mut s.k[t * kv_dim..(t + 1) * kv_dim]);
                match cfg.arch.rope {
                    RopeStyle::Adjacent => {
                        self.rope.apply(q, pos);
                        self.rope.apply(k, pos);
                    }
                    RopeStyle::Halves => {
                        self.rope.apply_halves(q, pos);
                        self.rope.apply_halves(k, pos);
                    }
                }

                let table = b.seqs[b.seq_of[t] as usize].block_table;
                let block = table[pos / shape.block_size].0 as usize;
                write_kv(
                    shape,
                    &mut cache.k,
                    &mut cache.v,
                    block,
                    pos % shape.block_size,
                    &s.k[t * kv_dim..(t + 1) * kv_dim],
                    &s.v[t * kv_dim..(t + 1) * kv_dim],
                );
            }
            on_layer(li, LayerKvBytes::from_slices(&cache.k, &cache.v, shape.block_elems() * std::mem::size_of::<E>()));
            {
                let (q, k_cache, v_cache) = (&s.q, &cache.k, &cache.v);
                let out = SyncPtr::new(&mut s.attn);
                let items = n * cfg.n_kv_heads;
                pool.run(|tid, nt| {
                    let mut scores = vec![0f32; group * max_ctx];
                    for item in split_range(items, tid, nt, 1) {
                        let (t, kvh) = (item / cfg.n_kv_heads, item % cfg.n_kv_heads);
                        let off = t * q_dim + kvh * group * hd;
                        let args = AttendArgs {
                            shape,
                            q: &q[off..off + group * hd],
                            k_cache,
                            v_cache,
                            kv_head: kvh,
                            block_table: BlockId::as_u32s(b.seqs[b.seq_of[t] as usize].block_table),
                            ctx_len: b.positions[t] as usize + 1,
                            scale,
                        };
                        // SAFETY: each (token, kv head) item owns its slice of the output.
                        let o = unsafe { out.slice(off, group * hd) };
                        attend(isa, &args, o, &mut scores);
                    }
                });
            }
            s.xq.quantize(pool, isa, &s.attn, n, q_dim);
            matmul(pool, isa, &layer.wo, &s.attn, &s.xq, n, &mut s.tmp);
            add_in_place(&mut s.x[..n * h], &s.tmp[..n * h]);

            // Feed-forward block.
            self.norm_rows(&s.x, &layer.ffn_norm, &mut s.xn, n);
            s.xq.quantize(pool, isa, &s.xn, n, h);
            matmul(pool, isa, &layer.w_gate, &s.xn, &s.xq, n, &mut s.gate);
            matmul(pool, isa, &layer.w_up, &s.xn, &s.xq, n, &mut s.up);
            {
                let ffn = cfg.ffn;
                let (g, u) = (SyncPtr::new(&mut s.gate), &s.up);
                let work = |tid: usize, nt: usize| {
                    let r = split_range(n * ffn, tid, nt, 64);
                    // SAFETY: threads own disjoint ranges.
                    let gs = unsafe { g.slice(r.start, r.len()) };
                    swiglu_isa(isa, gs, &u[r]);
                };
                if n * ffn >= 8192 {
                    pool.run(work);
                } else {
                    work(0, 1);
                }
            }
            s.xq.quantize(pool, isa, &s.gate, n, cfg.ffn);
            matmul(pool, isa, &layer.w_down, &s.gate, &s.xq, n, &mut s.tmp);
            add_in_place(&mut s.x[..n * h], &s.tmp[..n * h]);
        }

        // Final norm and logits, only for the tokens asked for.
        let m = b.logits_for.len();
        if m == 0 {
            return;
        }
        for (j, &t) in b.logits_for.iter().enumerate() {
            let t = t as usize;
            rms_norm(&s.x[t * h..(t + 1) * h], &self.output_norm, cfg.rms_eps, &mut s.xn[j * h..(j + 1) * h]);
        }
        grow(&mut s.logits, m * cfg.vocab_size);
        s.xq.quantize(pool, isa, &s.xn, m, h);
        let out_w = self.output.as_ref().unwrap_or(&self.embed);
        matmul(pool, isa, out_w, &s.xn, &s.xq, m, &mut s.logits);
    }

    fn norm_rows(&self, x: &[f32], w: &[f32], out: &mut [f32], n: usize) {
        let h = self.config.hidden;
        let eps = self.config.rms_eps;
        for t in 0..n {
            rms_norm(&x[t * h..(t + 1) * h], w, eps, &mut out[t * h..(t + 1) * h]);
        }
    }
}

/// Adds `bias` to every row of `x` (rows of `bias.len()`).
fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_in_place(row, bias);
    }
}

fn tensor_bytes<'f>(f: &'f GgufFile, name: &str) -> Result<(&'f TensorInfo, GgmlType, &'f [u8]), EngineError> {
    let info = f.tensor(name).ok_or_else(|| EngineError::BadModel(format!("missing tensor {name}")))?;
    let Some(ggml_type) = GgmlType::from_id(info.type_id) else {
        return Err(EngineError::Unsupported(format!(
            "tensor {name} has type {}, which is not supported (supported: {})",
            GgmlType::name_of_id(info.type_id),
            GgmlType::supported_names()
        )));
    };
    Ok((info, ggml_type, f.tensor_data(info)?))
}

fn load_matrix(f: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<Weights, EngineError> {
    let (info, ggml_type, bytes) = tensor_bytes(f, name)?;
    if info.dims.len() != 2 || info.dims[0] as usize != cols || info.dims[1] as usize != rows {
        return Err(EngineError::BadModel(format!(
            "tensor {name} has shape {:?}, expected [{cols}, {rows}]",
            info.dims
        )));
    }
    Weights::from_ggml(ggml_type, bytes, rows, cols).map_err(|e| EngineError::BadModel(format!("tensor {name}: {e}")))
}

fn load_vector(f: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
    let (info, ggml_type, bytes) = tensor_bytes(f, name)?;
    if info.n_elements() != len as u64 {
        return Err(EngineError::BadModel(format!("tensor {name} has {} elements, expected {len}", info.n_elements())));
    }
    let mut out = vec![0f32; len];
    dequantize_row(ggml_type, bytes, &mut out);
    Ok(out)
}
