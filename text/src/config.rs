//! Model hyperparameters, read from GGUF metadata, and the architectures Tandem runs.

use crate::error::TextError;
use crate::gguf::GgufFile;

/// The shape of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// The model's name from `general.name`, if any.
    pub name: Option<String>,
    /// How this architecture's forward pass differs from Llama's.
    pub arch: ArchSpec,
}

/// Which elements of a head the rotary embedding turns together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// `(x[2i], x[2i+1])`: llama.cpp's "normal" mode; Llama GGUFs are converted for it.
    Adjacent,
    /// `(x[i], x[i + d/2])`: the GPT-NeoX mode, which Qwen2 keeps.
    Halves,
}

/// An architecture the forward pass runs, described by what sets it apart from Llama's
/// (pre-norm blocks, RMSNorm, grouped-query attention, SwiGLU): one forward pass reads
/// this description instead of each family having a model file of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchSpec {
    /// The `general.architecture` value.
    pub name: &'static str,
    pub rope: RopeStyle,
    /// Q, K and V projections carry biases (`blk.N.attn_{q,k,v}.bias`).
    pub qkv_bias: bool,
}

/// Every architecture the forward pass implements. A file of any other is refused by name.
pub const ARCHITECTURES: &[ArchSpec] = &[
    ArchSpec { name: "llama", rope: RopeStyle::Adjacent, qkv_bias: false },
    ArchSpec { name: "qwen2", rope: RopeStyle::Halves, qkv_bias: true },
];

/// `general.architecture` values the forward pass implements (the names of [`ARCHITECTURES`]).
pub(crate) const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

impl ArchSpec {
    pub fn by_name(name: &str) -> Option<ArchSpec> {
        ARCHITECTURES.iter().find(|a| a.name == name).copied()
    }
}

impl ModelConfig {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, TextError> {
        let arch = f
            .get_str("general.architecture")
            .ok_or_else(|| TextError::BadModel("GGUF file has no general.architecture".into()))?
            .to_string();
        let Some(spec) = ArchSpec::by_name(&arch) else {
            return Err(TextError::Unsupported(format!(
                "unsupported model architecture '{arch}' (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        };
        let req = |key: &str| -> Result<usize, TextError> {
            let full = format!("{arch}.{key}");
            f.get_u64(&full)
                .filter(|&v| v > 0 && v < 1 << 24)
                .map(|v| v as usize)
                .ok_or_else(|| TextError::BadModel(format!("missing or invalid metadata {full}")))
        };
        let n_layers = req("block_count")?;
        let hidden = req("embedding_length")?;
        let ffn = req("feed_forward_length")?;
        let n_heads = req("attention.head_count")?;
        let n_kv_heads = req("attention.head_count_kv").unwrap_or(n_heads);
        let context_length = req("context_length")?;
        let head_dim =
            f.get_u64(&format!("{arch}.attention.key_length")).map(|v| v as usize).unwrap_or(hidden / n_heads);
        let rope_dims = f.get_u64(&format!("{arch}.rope.dimension_count")).map(|v| v as usize).unwrap_or(head_dim);
        let rope_theta = f.get_f32(&format!("{arch}.rope.freq_base")).unwrap_or(10000.0);
        let rms_eps = f.get_f32(&format!("{arch}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5);
        let vocab_size = f
            .tensor("token_embd.weight")
            .filter(|t| t.dims.len() == 2)
            .map(|t| t.dims[1] as usize)
            .ok_or_else(|| TextError::BadModel("missing tensor token_embd.weight".into()))?;

        if n_heads % n_kv_heads != 0 {
            return Err(TextError::BadModel(format!("{n_heads} heads are not a multiple of {n_kv_heads} KV heads")));
        }
        if !head_dim.is_multiple_of(2) || rope_dims != head_dim {
            return Err(TextError::Unsupported(format!(
                "rotary dimension {rope_dims} with head dimension {head_dim} (partial or odd RoPE is not supported)"
            )));
        }
        if !(rope_theta.is_finite() && rope_theta > 1.0 && rms_eps.is_finite() && rms_eps > 0.0) {
            return Err(TextError::BadModel("invalid rope.freq_base or layer_norm_rms_epsilon".into()));
        }
        Ok(ModelConfig {
            architecture: arch,
            n_layers,
            hidden,
            ffn,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            context_length,
            rope_theta,
            rms_eps,
            name: f.get_str("general.name").map(str::to_string),
            arch: spec,
        })
    }

    /// Identifies the model for KV exchange: two workers whose fingerprints differ must not
    /// share KV. Built from the architecture, every shape parameter and the model's name.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h ^= b as u64;
                h = h.wrapping_mul(0x100_0000_01b3);
            }
        };
        eat(self.architecture.as_bytes());
        for v in [
            self.n_layers,
            self.hidden,
            self.ffn,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.vocab_size,
            self.context_length,
        ] {
            eat(&(v as u64).to_le_bytes());
        }
        eat(&self.rope_theta.to_le_bytes());
        eat(&self.rms_eps.to_le_bytes());
        eat(self.name.as_deref().unwrap_or("").as_bytes());
        h
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_described_architecture_is_listed_as_supported() {
        let names: Vec<&str> = ARCHITECTURES.iter().map(|a| a.name).collect();
        assert_eq!(names, SUPPORTED_ARCHITECTURES);
        assert_eq!(ArchSpec::by_name("qwen2").map(|a| (a.rope, a.qkv_bias)), Some((RopeStyle::Halves, true)));
        assert_eq!(ArchSpec::by_name("llama").map(|a| (a.rope, a.qkv_bias)), Some((RopeStyle::Adjacent, false)));
        assert_eq!(ArchSpec::by_name("gemma"), None);
    }
}
