//! `BlockId`: the index of a block in a paged KV pool, the number a block table holds
//! and the paged-attention and gather/scatter kernels index by. One type for every crate
//! that names a block: the engine's cache and block manager, and kvtransfer, whose frames
//! carry block ids between workers. Owns the id and its view as the kernels' `u32`
//! tables; does not allocate blocks (the engine's block manager does).

use std::fmt;

/// Index of a block in the pool.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct BlockId(pub u32);

impl BlockId {
    /// A block table as the kernels read it: the same memory, as `u32`s.
    pub fn as_u32s(ids: &[BlockId]) -> &[u32] {
        // SAFETY: BlockId is repr(transparent) over u32.
        unsafe { std::slice::from_raw_parts(ids.as_ptr() as *const u32, ids.len()) }
    }

    /// The index, for addressing a block's memory.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// The bare number, as block tables and messages have always printed it.
impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_reads_as_its_numbers_and_prints_as_them() {
        let table = [BlockId(3), BlockId(9)];
        assert_eq!(BlockId::as_u32s(&table), &[3, 9]);
        assert_eq!(format!("{table:?} {}", table[1]), "[3, 9] 9");
    }
}
