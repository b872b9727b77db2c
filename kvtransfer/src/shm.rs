//! Same-host transfer: the receiver's KV blocks live in a shared-memory
//! segment that the sender maps and writes in place; a Unix socket carries
//! the frames (the "doorbell": an in-place Blocks frame says which blocks of
//! which layer are now written, with their CRC32C).
//!
//! The bytes are copied once, from the sender's buffer straight into the
//! receiver's blocks, with no socket in between.
//!
//! What a sender trusts: the segment is the file next to the receiver's registered
//! socket (`segment_for_socket`: the socket's path without `.sock`), never a path
//! the peer names; the socket's peer must run as this user; the file must be a
//! regular file in `shm_dir()` named `tandem-kv-*`, not a symlink (`O_NOFOLLOW`),
//! owned by this user, mode 0600, with one link, and of the size the layout says.
//! It writes only blocks the receiver listed in its `Accept` of the session.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use tandem_kernels::BlockId;

use crate::error::TransferError;
use crate::layout::KvLayout;
use crate::sink::{block_offsets, KvSink};

/// Where segments are created: `/dev/shm` (tmpfs) unless `TANDEM_SHM_DIR` says otherwise.
pub fn shm_dir() -> PathBuf {
    std::env::var_os("TANDEM_SHM_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

/// Removes segments and sockets (`tandem-kv-<pid>-...`) in `shm_dir()` left by processes
/// that no longer run (killed before they could clean up). Returns how many it removed.
pub fn sweep_stale() -> usize {
    let Ok(dir) = std::fs::read_dir(shm_dir()) else { return 0 };
    let mut removed = 0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("tandem-kv-")) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            removed += usize::from(std::fs::remove_file(entry.path()).is_ok());
        }
    }
    removed
}

/// Identifies this host's kernel: two processes with the same id can share memory segments.
pub fn host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| std::env::var("HOSTNAME").unwrap_or_default())
}

/// A receiver's KV blocks in a shared-memory segment (the `HostKv` layout). The file is
/// removed when this is dropped; a sender's mapping stays valid until it unmaps.
pub struct ShmKv {
    layout: KvLayout,
    n_blocks: usize,
    path: PathBuf,
    base: *mut u8,
    len: usize,
    _map: MmapMut,
    _file: File,
}

// SAFETY: the mapping lives as long as self; writes go to disjoint reserved blocks (see KvSink).
unsafe impl Send for ShmKv {}
unsafe impl Sync for ShmKv {}

impl ShmKv {
    /// Creates a zeroed segment for `n_blocks` blocks in `shm_dir()`.
    pub fn create(layout: KvLayout, n_blocks: usize) -> Result<ShmKv, TransferError> {
        layout.validate().map_err(TransferError::Protocol)?;
        sweep_stale();
        let len = n_blocks * layout.block_bytes();
        let name = format!("tandem-kv-{}-{:x}", std::process::id(), rand_suffix());
        let path = shm_dir().join(name);
        // The owner's alone: a request's KV says much about its prompt.
        let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
        file.set_len(len as u64)?;
        // SAFETY: a private file we just created; no one truncates it while mapped.
        let mut map = unsafe { MmapMut::map_mut(&file)? };
        let base = map.as_mut_ptr();
        Ok(ShmKv { layout, n_blocks, path, base, len, _map: map, _file: file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the receiver's Unix socket for this segment listens (`segment_for_socket`
    /// maps it back): registering the socket registers the segment.
    pub fn socket_path(&self) -> PathBuf {
        socket_for_segment(&self.path)
    }

    /// Removes the segment's file now (mappings stay valid; no new sender can map it).
    /// Drop does the same; call this when the process may exit without dropping.
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.socket_path());
    }

    /// The mapped region (page-aligned, `len()` bytes), laid out as `block_offsets`
    /// says: an engine builds its KV cache over it, so received blocks land in place.
    pub fn region_ptr(&self) -> *mut u8 {
        self.base
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of one block of one layer, K then V.
    pub fn read_block(&self, layer: usize, block: usize) -> Vec<u8> {
        let half = self.layout.half_block_bytes();
        let (k, v) = self.block_ptrs(layer, block);
        let mut out = Vec::with_capacity(2 * half);
        // SAFETY: in-bounds ranges of the mapping.
        unsafe {
            out.extend_from_slice(std::slice::from_raw_parts(k, half));
            out.extend_from_slice(std::slice::from_raw_parts(v, half));
        }
        out
    }
}

impl Drop for ShmKv {
    fn drop(&mut self) {
        self.unlink();
    }
}

unsafe impl KvSink for ShmKv {
    fn layout(&self) -> KvLayout {
        self.layout
    }
    fn n_blocks(&self) -> usize {
        self.n_blocks
    }
    fn block_ptrs(&self, layer: usize, block: usize) -> (*mut u8, *mut u8) {
        assert!(
            layer < self.layout.n_layers as usize && block < self.n_blocks,
            "block ({layer}, {block}) out of range"
        );
        let (k, v) = block_offsets(&self.layout, self.n_blocks, layer, block);
        debug_assert!(v + self.layout.half_block_bytes() <= self.len);
        // SAFETY: offsets are inside the mapping.
        unsafe { (self.base.add(k), self.base.add(v)) }
    }
    fn shm_segment(&self) -> Option<String> {
        Some(self.path.to_string_lossy().into_owned())
    }
}

const SOCKET_SUFFIX: &str = ".sock";

/// The Unix socket that serves the segment at `segment`.
pub fn socket_for_segment(segment: &Path) -> PathBuf {
    let mut p = segment.as_os_str().to_owned();
    p.push(SOCKET_SUFFIX);
    PathBuf::from(p)
}

/// The segment a receiver's registered socket `socket` serves, if the name is one of ours.
pub fn segment_for_socket(socket: &Path) -> Option<PathBuf> {
    let name = socket.file_name()?.to_str()?.strip_suffix(SOCKET_SUFFIX)?;
    name.starts_with("tandem-kv-").then(|| socket.with_file_name(name))
}

/// This process's effective user id.
pub(crate) fn our_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A sender's mapping of a receiver's segment.
pub(crate) struct ShmMap {
    layout: KvLayout,
    n_blocks: usize,
    base: *mut u8,
    _map: MmapMut,
}

// SAFETY: the sender writes only blocks the receiver reserved for the session it sends.
unsafe impl Send for ShmMap {}
unsafe impl Sync for ShmMap {}

impl ShmMap {
    /// Maps the segment at `path` (derived from the receiver's registration, see
    /// `segment_for_socket`), refusing anything but a receiver's segment: a symlink, a file
    /// outside `shm_dir()` or not named `tandem-kv-*`, one another user owns, one others
    /// may read or write, one with other links, or one whose size is not `n_blocks` blocks.
    pub(crate) fn open(path: &Path, layout: KvLayout, n_blocks: u64) -> Result<ShmMap, TransferError> {
        let refuse = |why: String| TransferError::Protocol(format!("segment {}: {why}", path.display()));
        let n_blocks = usize::try_from(n_blocks).map_err(|_| refuse("too large".into()))?;
        let want = n_blocks.checked_mul(layout.block_bytes()).ok_or_else(|| refuse("too large".into()))?;
        let named = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("tandem-kv-"));
        if !named || path.parent() != Some(shm_dir().as_path()) {
            return Err(refuse(format!("not a segment in {}", shm_dir().display())));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| refuse(e.to_string()))?;
        // Checked on the file opened (fstat), not on the name: nothing can swap it in between.
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(refuse("not a regular file".into()));
        }
        if meta.uid() != our_uid() {
            return Err(refuse(format!("owned by uid {}, not ours", meta.uid())));
        }
        if meta.mode() & 0o777 != 0o600 {
            return Err(refuse(format!("mode {:o}, not 600", meta.mode() & 0o777)));
        }
        if meta.nlink() != 1 {
            return Err(refuse(format!("{} links", meta.nlink())));
        }
        let len = meta.len() as usize;
        if len != want {
            return Err(refuse(format!("{len} bytes, expected {want}")));
        }
        // SAFETY: the receiver created the file at this size and never truncates it.
        let mut map = unsafe { MmapMut::map_mut(&file)? };
        let base = map.as_mut_ptr();
        Ok(ShmMap { layout, n_blocks, base, _map: map })
    }

    /// Writes one layer of `blocks` (payload: per block K then V) into the segment.
    /// `accepted`: the blocks the receiver accepted this session for; a block outside
    /// them fails the call before anything is written.
    pub(crate) fn write(
        &self,
        accepted: &std::collections::HashSet<BlockId>,
        layer: u16,
        blocks: &[BlockId],
        payload: &[u8],
    ) -> Result<(), TransferError> {
        let half = self.layout.half_block_bytes();
        if layer >= self.layout.n_layers {
            return Err(TransferError::BadBlock(format!("layer {layer}")));
        }
        if let Some(b) = blocks.iter().find(|b| b.index() >= self.n_blocks || !accepted.contains(b)) {
            return Err(TransferError::BadBlock(format!("block {b} is not reserved for this session")));
        }
        for (i, &b) in blocks.iter().enumerate() {
            let (k, v) = block_offsets(&self.layout, self.n_blocks, layer as usize, b.index());
            let src = &payload[2 * half * i..2 * half * (i + 1)];
            // SAFETY: offsets are inside the mapping (checked above); the block is reserved
            // for this session on the receiver, so no one else writes it.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(k), half);
                std::ptr::copy_nonoverlapping(src.as_ptr().add(half), self.base.add(v), half);
            }
        }
        Ok(())
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}
