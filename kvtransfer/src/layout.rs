//! The KV layout both ends must agree on before one byte of KV moves.

/// Element type of the KV cache on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KvDtypeWire {
    F16 = 1,
    F32 = 2,
}

impl KvDtypeWire {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(KvDtypeWire::F16),
            2 => Some(KvDtypeWire::F32),
            _ => None,
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            KvDtypeWire::F16 => 2,
            KvDtypeWire::F32 => 4,
        }
    }
}

/// The shape of one worker's paged KV cache, as exchanged in the handshake.
///
/// One block of one layer is `block_size * n_kv_heads * head_dim` elements of K,
/// then as many of V (the engine's `[block][kv_head][slot][head_dim]` layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layers: u16,
    pub n_kv_heads: u16,
    pub head_dim: u16,
    pub block_size: u16,
    pub dtype: KvDtypeWire,
    /// Identifies the model's weights: KV from another model is garbage here.
    pub fingerprint: u64,
}

impl KvLayout {
    /// Bytes of K (or of V) for one block of one layer.
    pub fn half_block_bytes(&self) -> usize {
        self.block_size as usize * self.n_kv_heads as usize * self.head_dim as usize * self.dtype.bytes()
    }

    /// Bytes of K and V for one block of one layer.
    pub fn layer_block_bytes(&self) -> usize {
        2 * self.half_block_bytes()
    }

    /// Bytes of one block across all layers.
    pub fn block_bytes(&self) -> usize {
        self.n_layers as usize * self.layer_block_bytes()
    }

    /// Why two layouts cannot exchange KV, if they cannot.
    pub fn mismatch(&self, other: &KvLayout) -> Option<String> {
        let mut diffs = Vec::new();
        let mut cmp = |name: &str, a: u64, b: u64| {
            if a != b {
                diffs.push(format!("{name} {a} vs {b}"));
            }
        };
        cmp("layers", self.n_layers as u64, other.n_layers as u64);
        cmp("kv heads", self.n_kv_heads as u64, other.n_kv_heads as u64);
        cmp("head dim", self.head_dim as u64, other.head_dim as u64);
        cmp("block size", self.block_size as u64, other.block_size as u64);
        cmp("dtype bytes", self.dtype.bytes() as u64, other.dtype.bytes() as u64);
        if self.fingerprint != other.fingerprint {
            diffs.push(format!("model fingerprint {:#x} vs {:#x}", self.fingerprint, other.fingerprint));
        }
        (!diffs.is_empty()).then(|| format!("KV layout mismatch: {}", diffs.join(", ")))
    }

    /// Rejects layouts no real model has (zero sizes), before anything is allocated from them.
    pub fn validate(&self) -> Result<(), String> {
        if self.n_layers == 0 || self.n_kv_heads == 0 || self.head_dim == 0 || self.block_size == 0 {
            return Err("KV layout with a zero dimension".into());
        }
        Ok(())
    }
}
