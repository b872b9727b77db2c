//! The paged KV cache: per-layer K and V storage split into fixed-size blocks,
//! and the allocator that hands blocks to sequences.
//!
//! Storage is `[layer] -> [block][kv_head][slot][head_dim]` (see
//! `tandem_kernels::attention`). A sequence owns an append-only block table;
//! nothing else knows where its tokens live. Which block belongs to whom is
//! the block manager's business (`block_manager.rs`), not this module's.

use half::f16;
use tandem_kernels::{KvElem, KvShape};

use crate::error::EngineError;

/// Index of a block in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct BlockId(pub u32);

/// A block table as the kernels read it.
pub fn block_ids_as_u32(ids: &[BlockId]) -> &[u32] {
    // SAFETY: BlockId is repr(transparent) over u32.
    unsafe { std::slice::from_raw_parts(ids.as_ptr() as *const u32, ids.len()) }
}

/// Element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F16,
    F32,
}

impl KvDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f16" => Some(KvDtype::F16),
            "f32" => Some(KvDtype::F32),
            _ => None,
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

/// One layer's K and V for every block.
#[derive(Debug)]
pub struct LayerKv<E> {
    pub k: Vec<E>,
    pub v: Vec<E>,
}

/// The cache's memory, typed.
#[derive(Debug)]
pub enum KvStorage {
    F16(Vec<LayerKv<f16>>),
    F32(Vec<LayerKv<f32>>),
}

/// All layers' K/V for `n_blocks` blocks.
#[derive(Debug)]
pub struct KvCache {
    pub shape: KvShape,
    pub n_layers: usize,
    pub n_blocks: usize,
    pub dtype: KvDtype,
    pub storage: KvStorage,
}

fn layers<E: KvElem>(n_layers: usize, elems: usize) -> Vec<LayerKv<E>> {
    (0..n_layers).map(|_| LayerKv { k: vec![E::default(); elems], v: vec![E::default(); elems] }).collect()
}

impl KvCache {
    pub fn new(shape: KvShape, n_layers: usize, n_blocks: usize, dtype: KvDtype) -> Result<Self, EngineError> {
        if shape.block_size == 0 || n_blocks == 0 || n_blocks > u32::MAX as usize {
            return Err(EngineError::InvalidRequest(format!(
                "a KV cache needs a positive block size and block count (got {} and {n_blocks})",
                shape.block_size
            )));
        }
        let elems = n_blocks * shape.block_elems();
        let storage = match dtype {
            KvDtype::F16 => KvStorage::F16(layers(n_layers, elems)),
            KvDtype::F32 => KvStorage::F32(layers(n_layers, elems)),
        };
        Ok(KvCache { shape, n_layers, n_blocks, dtype, storage })
    }

    /// Copies block `from` into block `to` in every layer (copy-on-write).
    pub fn copy_block(&mut self, from: BlockId, to: BlockId) {
        fn copy<E: Copy>(layers: &mut [LayerKv<E>], n: usize, from: usize, to: usize) {
            for l in layers {
                l.k.copy_within(from * n..(from + 1) * n, to * n);
                l.v.copy_within(from * n..(from + 1) * n, to * n);
            }
        }
        let n = self.shape.block_elems();
        let (f, t) = (from.0 as usize, to.0 as usize);
        match &mut self.storage {
            KvStorage::F16(l) => copy(l, n, f, t),
            KvStorage::F32(l) => copy(l, n, f, t),
        }
    }

    /// One layer's K and V as bytes (for shipping and checking blocks).
    pub fn layer_bytes(&self, layer: usize) -> crate::model::LayerKvBytes<'_> {
        let half = self.shape.block_elems() * self.dtype.bytes();
        match &self.storage {
            KvStorage::F16(l) => crate::model::LayerKvBytes::from_slices(&l[layer].k, &l[layer].v, half),
            KvStorage::F32(l) => crate::model::LayerKvBytes::from_slices(&l[layer].k, &l[layer].v, half),
        }
    }

    /// Overwrites one block of one layer from `data` (K then V, as `LayerKvBytes::gather` makes it).
    pub fn scatter_block(&mut self, layer: usize, block: BlockId, data: &[u8]) {
        fn put<E: KvElem>(l: &mut LayerKv<E>, n: usize, b: usize, data: &[u8]) {
            let size = n * std::mem::size_of::<E>();
            assert_eq!(data.len(), 2 * size);
            // SAFETY: plain-data elements; the ranges are in bounds (slice indexing checks it).
            unsafe {
                let k = &mut l.k[b * n..(b + 1) * n];
                std::ptr::copy_nonoverlapping(data.as_ptr(), k.as_mut_ptr() as *mut u8, size);
                let v = &mut l.v[b * n..(b + 1) * n];
                std::ptr::copy_nonoverlapping(data.as_ptr().add(size), v.as_mut_ptr() as *mut u8, size);
            }
        }
        let n = self.shape.block_elems();
        match &mut self.storage {
            KvStorage::F16(l) => put(&mut l[layer], n, block.0 as usize, data),
            KvStorage::F32(l) => put(&mut l[layer], n, block.0 as usize, data),
        }
    }

    /// Bytes one block takes across all layers, K and V.
    pub fn block_bytes(&self) -> usize {
        2 * self.n_layers * self.shape.block_elems() * self.dtype.bytes()
    }

    /// How many blocks fit in `bytes` for this shape.
    pub fn blocks_for_bytes(shape: KvShape, n_layers: usize, dtype: KvDtype, bytes: usize) -> usize {
        bytes / (2 * n_layers * shape.block_elems() * dtype.bytes()).max(1)
    }
}

/// Blocks needed to hold `tokens` tokens.
pub fn blocks_for_tokens(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let shape = KvShape { block_size: 16, n_kv_heads: 3, head_dim: 64 };
        let c = KvCache::new(shape, 30, 4, KvDtype::F16).unwrap();
        assert_eq!(c.block_bytes(), 2 * 30 * 16 * 3 * 64 * 2);
        assert_eq!(KvCache::blocks_for_bytes(shape, 30, KvDtype::F16, c.block_bytes() * 10 + 5), 10);
        assert_eq!(blocks_for_tokens(17, 16), 2);
        assert_eq!(blocks_for_tokens(16, 16), 1);
    }
}
