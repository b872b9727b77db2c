//! Where received KV goes: the receiving worker's block memory.

use std::cell::UnsafeCell;

use crate::layout::KvLayout;

/// Memory a receiver writes KV blocks into, in place (no staging copy).
///
/// # Safety
/// `block_ptrs` must return pointers to two distinct, writable ranges of
/// `layout().half_block_bytes()` bytes that stay valid as long as the sink
/// lives, and distinct `(layer, block)` pairs must not overlap. The receiver
/// writes a block only while it is reserved for exactly one request.
pub unsafe trait KvSink: Send + Sync + 'static {
    fn layout(&self) -> KvLayout;
    fn n_blocks(&self) -> usize;
    /// K and V halves of `block` in `layer`.
    fn block_ptrs(&self, layer: usize, block: usize) -> (*mut u8, *mut u8);
    /// The shared-memory segment holding these blocks, if senders on this host may write it directly.
    fn shm_segment(&self) -> Option<String> {
        None
    }
}

/// Byte offsets of a block's K and V halves in a region laid out like `HostKv`.
pub fn block_offsets(layout: &KvLayout, n_blocks: usize, layer: usize, block: usize) -> (usize, usize) {
    let half = layout.half_block_bytes();
    let base = layer * 2 * n_blocks * half;
    (base + block * half, base + (n_blocks + block) * half)
}

/// A plain host-memory KV region with the engine's layout: per layer, all
/// blocks' K, then all blocks' V. Used by tests and benchmarks, and as the
/// shape the engine's cache exposes.
pub struct HostKv {
    layout: KvLayout,
    n_blocks: usize,
    /// Per layer: K bytes of every block, then V bytes of every block.
    mem: Vec<UnsafeCell<Box<[u8]>>>,
}

// SAFETY: writes go through raw pointers to disjoint blocks (see KvSink).
unsafe impl Sync for HostKv {}
unsafe impl Send for HostKv {}

impl HostKv {
    pub fn new(layout: KvLayout, n_blocks: usize) -> Self {
        let per_layer = 2 * n_blocks * layout.half_block_bytes();
        let mem = (0..layout.n_layers).map(|_| UnsafeCell::new(vec![0u8; per_layer].into_boxed_slice())).collect();
        HostKv { layout, n_blocks, mem }
    }

    /// A copy of one block of one layer, K then V (the wire payload order).
    pub fn read_block(&self, layer: usize, block: usize) -> Vec<u8> {
        let (k, v) = self.block_ptrs(layer, block);
        let half = self.layout.half_block_bytes();
        let mut out = Vec::with_capacity(2 * half);
        // SAFETY: in-bounds ranges from block_ptrs; callers do not read blocks being written.
        unsafe {
            out.extend_from_slice(std::slice::from_raw_parts(k, half));
            out.extend_from_slice(std::slice::from_raw_parts(v, half));
        }
        out
    }

    /// Overwrites one block of one layer from `data` (K then V).
    pub fn write_block(&self, layer: usize, block: usize, data: &[u8]) {
        let half = self.layout.half_block_bytes();
        assert_eq!(data.len(), 2 * half);
        let (k, v) = self.block_ptrs(layer, block);
        // SAFETY: in-bounds, and the caller owns this block.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), k, half);
            std::ptr::copy_nonoverlapping(data.as_ptr().add(half), v, half);
        }
    }
}

unsafe impl KvSink for HostKv {
    fn layout(&self) -> KvLayout {
        self.layout
    }
    fn n_blocks(&self) -> usize {
        self.n_blocks
    }
    fn block_ptrs(&self, layer: usize, block: usize) -> (*mut u8, *mut u8) {
        assert!(layer < self.mem.len() && block < self.n_blocks, "block ({layer}, {block}) out of range");
        let half = self.layout.half_block_bytes();
        // SAFETY: the box is never reallocated; pointer arithmetic stays in bounds.
        let base = unsafe { (*self.mem[layer].get()).as_mut_ptr() };
        unsafe { (base.add(block * half), base.add((self.n_blocks + block) * half)) }
    }
}
