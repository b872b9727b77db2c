//! The paged KV cache's memory: per-layer K and V storage split into fixed-size
//! blocks, owned or laid over a region someone else maps (`KvCache::from_raw`),
//! with block copies (copy-on-write) and the byte views that ship blocks between
//! workers (`LayerKvBytes`, `scatter_block`).
//!
//! Storage is `[layer] -> [block][kv_head][slot][head_dim]` (see
//! `tandem_kernels::attention`). It allocates nothing: which block belongs to
//! whom (block tables, the free list, the prefix cache) is the block manager's
//! business (`block_manager.rs`), not this module's.

use half::f16;
use tandem_kernels::{KvElem, KvShape};

use crate::error::EngineError;

/// Index of a block in the pool; one type with kvtransfer's frames (see `tandem_kernels::block`).
pub use tandem_kernels::BlockId;

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

/// Memory for one layer's K or V: owned, or borrowed from a region someone
/// else maps (a shared-memory segment a KV receiver writes into).
pub struct KvBuf<E> {
    ptr: std::ptr::NonNull<E>,
    len: usize,
    /// The owned allocation; `None` when the memory is external.
    owned: Option<Vec<E>>,
}

// SAFETY: a KvBuf is either a Vec or a region the creator promised outlives it
// (`KvCache::from_raw`); access follows Rust's borrow rules through Deref.
unsafe impl<E: Send> Send for KvBuf<E> {}
unsafe impl<E: Sync> Sync for KvBuf<E> {}

impl<E: Copy> KvBuf<E> {
    fn owned(mut v: Vec<E>) -> Self {
        let ptr = std::ptr::NonNull::new(v.as_mut_ptr()).expect("a Vec's pointer is never null");
        KvBuf { ptr, len: v.len(), owned: Some(v) }
    }
}

impl<E> std::ops::Deref for KvBuf<E> {
    type Target = [E];
    fn deref(&self) -> &[E] {
        // SAFETY: ptr/len describe live memory (the Vec, or the external region).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<E> std::ops::DerefMut for KvBuf<E> {
    fn deref_mut(&mut self) -> &mut [E] {
        // SAFETY: as for Deref; `&mut self` makes this the only access through the buffer.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<E> std::fmt::Debug for KvBuf<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvBuf").field("len", &self.len).field("external", &self.owned.is_none()).finish()
    }
}

/// One layer's K and V for every block.
#[derive(Debug)]
pub struct LayerKv<E> {
    pub k: KvBuf<E>,
    pub v: KvBuf<E>,
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
    /// Keeps external memory alive (see `from_raw`).
    _external: Option<ExternalOwner>,
}

/// One layer's K and V caches as bytes, for shipping blocks to another worker.
#[derive(Debug, Clone, Copy)]
pub struct LayerKvBytes<'a> {
    pub k: &'a [u8],
    pub v: &'a [u8],
    /// Bytes of K (or V) per block.
    pub half_block_bytes: usize,
}

impl<'a> LayerKvBytes<'a> {
    /// A byte view of one layer's K and V elements.
    pub(crate) fn from_slices<E: KvElem>(k: &'a [E], v: &'a [E], half_block_bytes: usize) -> Self {
        // SAFETY: f16 and f32 are plain data without padding; any byte view is valid.
        let bytes =
            |x: &'a [E]| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) };
        LayerKvBytes { k: bytes(k), v: bytes(v), half_block_bytes }
    }

    /// Appends the blocks' K then V, block by block (the KV transfer payload order).
    pub fn gather(&self, blocks: &[BlockId], out: &mut Vec<u8>) {
        let h = self.half_block_bytes;
        for b in blocks {
            let o = b.0 as usize * h;
            out.extend_from_slice(&self.k[o..o + h]);
            out.extend_from_slice(&self.v[o..o + h]);
        }
    }
}

/// Whatever keeps an external region mapped.
struct ExternalOwner(#[allow(dead_code)] std::sync::Arc<dyn Send + Sync>);

impl std::fmt::Debug for ExternalOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExternalOwner")
    }
}

fn layers<E: KvElem>(n_layers: usize, elems: usize) -> Vec<LayerKv<E>> {
    (0..n_layers)
        .map(|_| LayerKv { k: KvBuf::owned(vec![E::default(); elems]), v: KvBuf::owned(vec![E::default(); elems]) })
        .collect()
}

/// Layers laid out in one region: per layer, every block's K, then every block's V.
///
/// # Safety
/// `base` must point to `n_layers * 2 * elems` writable, aligned elements.
unsafe fn external_layers<E: KvElem>(base: *mut u8, n_layers: usize, elems: usize) -> Vec<LayerKv<E>> {
    let base = base as *mut E;
    let buf = |off: usize| KvBuf {
        // SAFETY: in bounds of the region by the caller's promise; never null.
        ptr: unsafe { std::ptr::NonNull::new_unchecked(base.add(off)) },
        len: elems,
        owned: None,
    };
    (0..n_layers).map(|l| LayerKv { k: buf(2 * l * elems), v: buf((2 * l + 1) * elems) }).collect()
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
        Ok(KvCache { shape, n_layers, n_blocks, dtype, storage, _external: None })
    }

    /// Bytes a cache of this shape needs in the single-region layout `from_raw` reads:
    /// per layer, every block's K, then every block's V.
    pub fn region_bytes(shape: KvShape, n_layers: usize, n_blocks: usize, dtype: KvDtype) -> usize {
        2 * n_layers * n_blocks * shape.block_elems() * dtype.bytes()
    }

    /// A cache over memory someone else owns (a shared-memory segment that a KV
    /// receiver writes received blocks into), laid out as `region_bytes` says.
    ///
    /// # Safety
    /// `base` must point to `region_bytes(..)` writable bytes, aligned for `dtype`, that
    /// stay valid while `owner` lives. Other writers may touch only blocks the engine does
    /// not read or write meanwhile (blocks reserved for a request waiting for its KV).
    pub unsafe fn from_raw(
        shape: KvShape,
        n_layers: usize,
        n_blocks: usize,
        dtype: KvDtype,
        base: *mut u8,
        owner: std::sync::Arc<dyn Send + Sync>,
    ) -> Result<Self, EngineError> {
        if shape.block_size == 0 || n_blocks == 0 || n_blocks > u32::MAX as usize || base.is_null() {
            return Err(EngineError::InvalidRequest("an external KV region needs blocks and memory".into()));
        }
        if (base as usize) % dtype.bytes() != 0 {
            return Err(EngineError::InvalidRequest("the external KV region is misaligned".into()));
        }
        let elems = n_blocks * shape.block_elems();
        // SAFETY: the caller's promise covers the whole region.
        let storage = unsafe {
            match dtype {
                KvDtype::F16 => KvStorage::F16(external_layers(base, n_layers, elems)),
                KvDtype::F32 => KvStorage::F32(external_layers(base, n_layers, elems)),
            }
        };
        Ok(KvCache { shape, n_layers, n_blocks, dtype, storage, _external: Some(ExternalOwner(owner)) })
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
    pub fn layer_bytes(&self, layer: usize) -> LayerKvBytes<'_> {
        let half = self.shape.block_elems() * self.dtype.bytes();
        match &self.storage {
            KvStorage::F16(l) => LayerKvBytes::from_slices(&l[layer].k, &l[layer].v, half),
            KvStorage::F32(l) => LayerKvBytes::from_slices(&l[layer].k, &l[layer].v, half),
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
