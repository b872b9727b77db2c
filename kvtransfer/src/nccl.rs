//! GPU-to-GPU KV transfer over NCCL (feature `cuda`).
//!
//! **Compiled, not wired to any worker.** No crate of the workspace enables `cuda`; the
//! engine keeps its KV cache in host memory; the KV wire protocol (`PROTOCOL.md`) has no
//! frame that carries an NCCL id or announces a layer's block ids without its payload;
//! decode workers advertise `KvEndpoints.nccl = false` and no sender reads it. CI builds
//! this module and runs its unit tests, which need no GPU; nothing in it has run on a
//! device.
//!
//! The TCP transport moves KV through host memory; this one would keep it on the GPUs.
//! Each layer's blocks are gathered on the prefill GPU into one contiguous staging
//! buffer (kernel `gather_kv_blocks*` of `kernels/cuda/kv_blocks.cu`), sent with one
//! NCCL `send`, received with the matching `recv` into a staging buffer on the decode
//! GPU, and scattered into the destination blocks (`scatter_kv_blocks*`). The staging
//! buffer has exactly the layout of a TCP Blocks frame's payload (for each block in
//! order: its K bytes, then its V bytes, for one layer), so the receiver's cache would
//! look the same whichever transport filled it.
//!
//! ## What a caller must provide
//!
//! NCCL carries only the KV bytes. Everything else needs a control path between the two
//! workers, which does not exist yet; a caller must:
//!
//! 1. Make both ends agree on the [`KvLayout`] (as the TCP handshake's `Hello`/`HelloOk`
//!    does): the byte count of each NCCL message is derived from it, and NCCL does not
//!    check it.
//! 2. Build one communicator per prefill/decode pair: one worker creates the NCCL unique
//!    id ([`new_unique_id`], [`NCCL_ID_LEN`] bytes) and hands it to the other; both call
//!    [`NcclTransport::new`] with it, the prefill as rank 0 ([`Role::Prefill`], the
//!    sender), the decode as rank 1 ([`Role::Decode`], the receiver). Creation blocks
//!    until both ranks have joined.
//! 3. Per layer, tell the decode worker the destination block ids (decode-side ids, as
//!    in a Blocks frame) that the prefill passes to [`NcclTransport::send_layer`]; the
//!    decode worker calls [`NcclTransport::recv_layer`] with the same ids. NCCL pairs a
//!    send with the peer's receives in the order they were issued, so both sides must
//!    issue layers in the same order. Both compute the message size as
//!    `n_blocks * layer_block_bytes()` ([`payload_bytes`]).
//! 4. On the decode side, let the compute stream wait for the transport's stream (or call
//!    [`NcclTransport::synchronize`]) before reading the blocks.
//!
//! An NCCL error poisons the communicator: the caller must fail the affected requests,
//! drop the transport and build a new one (new id).
//!
//! ## Streams and buffers
//!
//! All work of a transport (id upload, gather, send, recv, scatter) is ordered on one
//! CUDA stream, so the staging buffer is reused without races; a layer's gather
//! starts when the previous layer's send has finished. Reads of the caches wait for
//! their pending writes through cudarc's event tracking. Block-id uploads go through a
//! small ring of pinned host buffers, so the issuing thread does not wait for the
//! previous transfers unless it is [`ID_RING`] layers ahead.
//!
//! ## Availability
//!
//! The CUDA driver, NVRTC and NCCL are loaded at run time. [`check_libraries`] and
//! every constructor check they are present and return [`NcclError::Unavailable`]
//! (never a panic) when they or a GPU are missing, so a caller can fall back to TCP.
//! The kernels are compiled at run time by NVRTC, for the device's architecture, from
//! the source embedded in this crate; the source needs no CUDA headers.

// `%` rather than `is_multiple_of`, which is newer than the workspace's rust-version (1.85).
#![allow(clippy::manual_is_multiple_of)]

use std::collections::HashSet;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceSlice, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};
use cudarc::nccl::{Comm, Id};
use cudarc::nvrtc::{CompileOptions, Ptx};
use tandem_kernels::BlockId;

use crate::layout::KvLayout;

/// The CUDA source of the gather/scatter kernels, compiled at run time by NVRTC.
pub const KV_BLOCKS_CU: &str = include_str!("../../kernels/cuda/kv_blocks.cu");

/// Size of an NCCL unique id, as one worker must hand it to the other.
pub const NCCL_ID_LEN: usize = 128;

/// Rank of the prefill worker (the sender) in a pair's communicator.
pub const PREFILL_RANK: usize = 0;
/// Rank of the decode worker (the receiver) in a pair's communicator.
pub const DECODE_RANK: usize = 1;

/// How many block-id uploads may be in flight before the host waits for the oldest.
pub const ID_RING: usize = 4;

/// Threads per CUDA block of the gather/scatter kernels.
const THREADS: u32 = 256;
/// Cap on `gridDim.x`: the kernels loop over the rest of a half block.
const MAX_GRID_X: u32 = 64;
/// Hardware limit of `gridDim.y`: the kernels loop over the rest of the block list.
const MAX_GRID_Y: u32 = 65_535;

/// Why the GPU transport cannot be used or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NcclError {
    /// No CUDA driver, NVRTC, NCCL or GPU here: use the TCP transport.
    #[error("GPU KV transfer unavailable: {0}")]
    Unavailable(String),
    /// A CUDA driver call failed (allocation, copy, kernel launch, sync).
    #[error("CUDA driver error during {0}")]
    Driver(String),
    /// NVRTC could not compile the kernels.
    #[error("NVRTC could not compile kv_blocks.cu: {0}")]
    Compile(String),
    /// An NCCL call failed; the communicator must be rebuilt.
    #[error("NCCL error during {0}")]
    Nccl(String),
    /// The caller's arguments are inconsistent (sizes, block ids, role).
    #[error("invalid KV transfer request: {0}")]
    Invalid(String),
}

/// Which end of the pair this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Rank 0: gathers and sends.
    Prefill,
    /// Rank 1: receives and scatters.
    Decode,
}

impl Role {
    pub fn rank(self) -> usize {
        match self {
            Role::Prefill => PREFILL_RANK,
            Role::Decode => DECODE_RANK,
        }
    }
    fn peer(self) -> i32 {
        match self {
            Role::Prefill => DECODE_RANK as i32,
            Role::Decode => PREFILL_RANK as i32,
        }
    }
}

/// Checks that the CUDA driver, NVRTC and NCCL libraries can be loaded.
pub fn check_libraries() -> Result<(), NcclError> {
    // SAFETY: each check only tries to dlopen the library (running its initialisers);
    // the handle is dropped right away and no symbol is called.
    let present = unsafe {
        [
            ("CUDA driver (libcuda)", cudarc::driver::sys::is_culib_present()),
            ("NVRTC (libnvrtc)", cudarc::nvrtc::sys::is_culib_present()),
            ("NCCL (libnccl)", cudarc::nccl::sys::is_culib_present()),
        ]
    };
    let missing: Vec<&str> = present.iter().filter(|(_, ok)| !ok).map(|(name, _)| *name).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(NcclError::Unavailable(format!("cannot load {}", missing.join(", "))))
    }
}

fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> NcclError {
    NcclError::Nccl(format!("{what}: {:?}", e.0))
}

fn driver_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> NcclError + '_ {
    move |e| NcclError::Driver(format!("{what}: {e}"))
}

/// Creates a fresh NCCL unique id for one pair's communicator, to hand to the peer (see
/// the module doc). Needs only the NCCL library, no GPU.
pub fn new_unique_id() -> Result<[u8; NCCL_ID_LEN], NcclError> {
    // SAFETY: see `check_libraries`.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(NcclError::Unavailable("cannot load NCCL (libnccl)".into()));
    }
    let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    let mut out = [0u8; NCCL_ID_LEN];
    for (o, c) in out.iter_mut().zip(id.internal().iter()) {
        *o = *c as u8;
    }
    Ok(out)
}

/// Rebuilds an NCCL id from the bytes [`new_unique_id`] made on the peer.
pub fn id_from_bytes(bytes: &[u8]) -> Result<Id, NcclError> {
    if bytes.len() != NCCL_ID_LEN {
        return Err(NcclError::Invalid(format!("NCCL id of {} bytes, expected {NCCL_ID_LEN}", bytes.len())));
    }
    let mut internal = [0 as std::ffi::c_char; NCCL_ID_LEN];
    for (i, b) in internal.iter_mut().zip(bytes) {
        *i = *b as std::ffi::c_char;
    }
    Ok(Id::uninit(internal))
}

/// Bytes of one layer's NCCL message for `n_blocks` blocks: the same as a Blocks payload.
pub fn payload_bytes(layout: &KvLayout, n_blocks: usize) -> usize {
    n_blocks * layout.layer_block_bytes()
}

/// Compiles the embedded kernels to PTX with NVRTC, for `compute_XY` when `arch` is
/// `Some((X, Y))`, else for NVRTC's default virtual architecture. Needs only NVRTC.
pub fn compile_kernels(arch: Option<(i32, i32)>) -> Result<Ptx, NcclError> {
    // SAFETY: see `check_libraries`.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(NcclError::Unavailable("cannot load NVRTC (libnvrtc)".into()));
    }
    let mut options = vec!["--std=c++17".to_string()];
    if let Some((major, minor)) = arch {
        options.push(format!("--gpu-architecture=compute_{major}{minor}"));
    }
    let opts = CompileOptions { options, name: Some("kv_blocks.cu".into()), ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(KV_BLOCKS_CU, opts).map_err(|e| NcclError::Compile(compile_error_text(&e)))
}

fn compile_error_text(e: &cudarc::nvrtc::CompileError) -> String {
    match e {
        cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. } => {
            format!("{nvrtc:?}: {}", log.to_string_lossy())
        }
        other => format!("{other:?}"),
    }
}

/// Which kernel variant a launch uses and how it is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LaunchPlan {
    /// 16-byte words (`*_vec16`) rather than 16-bit words.
    vec16: bool,
    /// Words of one half block (K or V of one block of one layer).
    words: u64,
    cfg: (u32, u32, u32),
}

/// Picks the widest word that divides a half block and fits the pointers' alignment.
fn plan_launch(half_block_bytes: usize, n_blocks: usize, aligned16: bool) -> Result<LaunchPlan, NcclError> {
    if half_block_bytes == 0 || n_blocks == 0 {
        return Err(NcclError::Invalid("empty layout or block list".into()));
    }
    let (vec16, words) = if aligned16 && half_block_bytes % 16 == 0 {
        (true, half_block_bytes / 16)
    } else if half_block_bytes % 2 == 0 {
        (false, half_block_bytes / 2)
    } else {
        return Err(NcclError::Invalid(format!("half block of {half_block_bytes} bytes is not whole 16-bit words")));
    };
    let gx = words.div_ceil(THREADS as usize).clamp(1, MAX_GRID_X as usize) as u32;
    let gy = n_blocks.min(MAX_GRID_Y as usize) as u32;
    Ok(LaunchPlan { vec16, words: words as u64, cfg: (gx, gy, 2) })
}

/// Checks block ids against the cache size; a scatter destination also may not repeat.
fn validate_ids(ids: &[BlockId], n_cache_blocks: usize, distinct: bool) -> Result<(), NcclError> {
    if ids.is_empty() {
        return Err(NcclError::Invalid("no blocks".into()));
    }
    if ids.len() > u32::MAX as usize {
        return Err(NcclError::Invalid(format!("{} blocks in one layer", ids.len())));
    }
    if let Some(bad) = ids.iter().find(|id| id.index() >= n_cache_blocks) {
        return Err(NcclError::Invalid(format!("block id {bad} outside a cache of {n_cache_blocks} blocks")));
    }
    if distinct {
        let mut seen = HashSet::with_capacity(ids.len());
        if let Some(dup) = ids.iter().find(|id| !seen.insert(**id)) {
            return Err(NcclError::Invalid(format!("destination block {dup} appears twice")));
        }
    }
    Ok(())
}

/// Number of cache blocks in one layer's K (or V) buffer of `bytes` bytes.
fn cache_blocks(what: &str, bytes: usize, half_block_bytes: usize) -> Result<usize, NcclError> {
    if half_block_bytes == 0 || bytes % half_block_bytes != 0 {
        return Err(NcclError::Invalid(format!(
            "{what} cache of {bytes} bytes is not whole blocks of {half_block_bytes} bytes"
        )));
    }
    Ok(bytes / half_block_bytes)
}

/// The four kernels of `kv_blocks.cu`, loaded into one context.
struct Kernels {
    gather: CudaFunction,
    scatter: CudaFunction,
    gather_vec16: CudaFunction,
    scatter_vec16: CudaFunction,
}

/// One slot of the block-id upload ring: pinned host ids and their device copy, of equal length.
struct IdSlot {
    host: PinnedHostSlice<u32>,
    dev: CudaSlice<u32>,
}

/// One end of a prefill/decode pair's NCCL KV transport.
///
/// Not `Send`: NCCL communicators are driven from the thread that owns them; run one
/// transport per pair on a dedicated thread.
pub struct NcclTransport {
    role: Role,
    layout: KvLayout,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    comm: Comm,
    staging: Option<CudaSlice<u8>>,
    ids: Vec<Option<IdSlot>>,
    next_slot: usize,
}

impl NcclTransport {
    /// Opens GPU `device`, compiles and loads the kernels, and joins the pair's
    /// communicator from the `id` bytes both workers hold (see the module doc). Blocks
    /// until the peer has joined too.
    pub fn new(device: usize, role: Role, id: &[u8], layout: KvLayout) -> Result<Self, NcclError> {
        check_libraries()?;
        layout.validate().map_err(NcclError::Invalid)?;
        let id = id_from_bytes(id)?;
        let ctx = CudaContext::new(device)
            .map_err(|e| NcclError::Unavailable(format!("cannot open CUDA device {device}: {e}")))?;
        let stream = ctx.new_stream().map_err(driver_err("cuStreamCreate"))?;
        let arch = ctx.compute_capability().map_err(driver_err("cuDeviceGetAttribute"))?;
        // NVRTC may predate the device: fall back to its default (JIT-compiled) target.
        let ptx = compile_kernels(Some(arch)).or_else(|_| compile_kernels(None))?;
        let module = ctx.load_module(ptx).map_err(driver_err("cuModuleLoadData"))?;
        let load = |name: &str| module.load_function(name).map_err(driver_err(name));
        let kernels = Kernels {
            gather: load("gather_kv_blocks")?,
            scatter: load("scatter_kv_blocks")?,
            gather_vec16: load("gather_kv_blocks_vec16")?,
            scatter_vec16: load("scatter_kv_blocks_vec16")?,
        };
        ctx.bind_to_thread().map_err(driver_err("cuCtxSetCurrent"))?;
        let comm = Comm::from_rank(stream.clone(), role.rank(), 2, id).map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(NcclTransport {
            role,
            layout,
            ctx,
            stream,
            kernels,
            comm,
            staging: None,
            ids: (0..ID_RING).map(|_| None).collect(),
            next_slot: 0,
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// The stream all of this transport's work is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits until every transfer issued so far has completed on this GPU.
    pub fn synchronize(&self) -> Result<(), NcclError> {
        self.stream.synchronize().map_err(driver_err("cuStreamSynchronize"))
    }

    /// Prefill side: gathers blocks `block_ids` of one layer's K and V caches (each
    /// `n_cache_blocks * half_block_bytes` bytes, `[block][kv_head][slot][head_dim]`) into
    /// the staging buffer, then sends it to the decode rank. Asynchronous: returns once
    /// the work is queued on [`Self::stream`].
    pub fn send_layer<T>(
        &mut self,
        k: &CudaView<'_, T>,
        v: &CudaView<'_, T>,
        block_ids: &[BlockId],
    ) -> Result<(), NcclError> {
        if self.role != Role::Prefill {
            return Err(NcclError::Invalid("send_layer on the decode (receiving) rank".into()));
        }
        let hbb = self.layout.half_block_bytes();
        let n_cache = cache_blocks("K", k.num_bytes(), hbb)?;
        if v.num_bytes() != k.num_bytes() {
            return Err(NcclError::Invalid(format!("K is {} bytes but V is {}", k.num_bytes(), v.num_bytes())));
        }
        validate_ids(block_ids, n_cache, false)?;
        let bytes = payload_bytes(&self.layout, block_ids.len());
        let aligned = self.aligned16(k) && self.aligned16(v);
        let plan = plan_launch(hbb, block_ids.len(), aligned)?;
        self.ensure_staging(bytes)?;
        let slot = self.upload_ids(BlockId::as_u32s(block_ids))?;

        let n_blocks = block_ids.len() as u32;
        let n_cache = n_cache.min(u32::MAX as usize) as u32;
        let func = if plan.vec16 { &self.kernels.gather_vec16 } else { &self.kernels.gather };
        let ids = &self.ids[slot].as_ref().expect("uploaded").dev;
        let staging = self.staging.as_mut().expect("ensured");
        let mut launch = self.stream.launch_builder(func);
        launch.arg(k).arg(v).arg(ids).arg(&n_blocks).arg(&n_cache).arg(&plan.words).arg(staging);
        // SAFETY: the argument list matches `gather_kv_blocks{,_vec16}` in kv_blocks.cu;
        // the caches hold `n_cache` blocks, every id is below it (checked above, and again
        // on the device), the staging buffer holds `2 * n_blocks * words` words, and
        // `plan` only picks 16-byte words for 16-byte-aligned pointers and sizes.
        unsafe { launch.launch(launch_config(&plan)) }.map_err(driver_err("launching gather_kv_blocks"))?;

        let staging = self.staging.as_ref().expect("ensured");
        self.comm.send(&staging.slice(0..bytes), self.role.peer()).map_err(|e| nccl_err("ncclSend", e))
    }

    /// Decode side: receives one layer's blocks from the prefill rank into the staging
    /// buffer, then scatters them into blocks `block_ids` of the K and V caches. The ids
    /// must be those the prefill passed to its `send_layer` for this layer, in the same
    /// order, and distinct. Asynchronous: returns once the work is queued on
    /// [`Self::stream`].
    pub fn recv_layer<T>(
        &mut self,
        block_ids: &[BlockId],
        k: &mut CudaViewMut<'_, T>,
        v: &mut CudaViewMut<'_, T>,
    ) -> Result<(), NcclError> {
        if self.role != Role::Decode {
            return Err(NcclError::Invalid("recv_layer on the prefill (sending) rank".into()));
        }
        let hbb = self.layout.half_block_bytes();
        let n_cache = cache_blocks("K", k.num_bytes(), hbb)?;
        if v.num_bytes() != k.num_bytes() {
            return Err(NcclError::Invalid(format!("K is {} bytes but V is {}", k.num_bytes(), v.num_bytes())));
        }
        validate_ids(block_ids, n_cache, true)?;
        let bytes = payload_bytes(&self.layout, block_ids.len());
        let aligned = self.aligned16(&*k) && self.aligned16(&*v);
        let plan = plan_launch(hbb, block_ids.len(), aligned)?;
        self.ensure_staging(bytes)?;
        let slot = self.upload_ids(BlockId::as_u32s(block_ids))?;

        {
            let staging = self.staging.as_mut().expect("ensured");
            let mut dst = staging.slice_mut(0..bytes);
            self.comm.recv(&mut dst, self.role.peer()).map_err(|e| nccl_err("ncclRecv", e))?;
        }

        let n_blocks = block_ids.len() as u32;
        let n_cache = n_cache.min(u32::MAX as usize) as u32;
        let func = if plan.vec16 { &self.kernels.scatter_vec16 } else { &self.kernels.scatter };
        let ids = &self.ids[slot].as_ref().expect("uploaded").dev;
        let staging = self.staging.as_ref().expect("ensured");
        let mut launch = self.stream.launch_builder(func);
        launch.arg(staging).arg(ids).arg(&n_blocks).arg(&n_cache).arg(&plan.words).arg(k).arg(v);
        // SAFETY: as in `send_layer`, for `scatter_kv_blocks{,_vec16}`; the ids are also
        // distinct, so no two CUDA blocks write the same cache block.
        unsafe { launch.launch(launch_config(&plan)) }.map_err(driver_err("launching scatter_kv_blocks"))?;
        Ok(())
    }

    fn aligned16<T, S: DevicePtr<T>>(&self, s: &S) -> bool {
        let (ptr, _record) = s.device_ptr(&self.stream);
        ptr % 16 == 0
    }

    /// Grows the staging buffer to at least `bytes` (stream-ordered: the old one is
    /// freed after the work that uses it).
    fn ensure_staging(&mut self, bytes: usize) -> Result<(), NcclError> {
        if self.staging.as_ref().is_some_and(|s| s.len() >= bytes) {
            return Ok(());
        }
        let s = self.stream.alloc_zeros::<u8>(bytes).map_err(driver_err("allocating the staging buffer"))?;
        self.staging = Some(s);
        Ok(())
    }

    /// Copies `ids` to the device through the next ring slot; returns the slot.
    fn upload_ids(&mut self, ids: &[u32]) -> Result<usize, NcclError> {
        let slot = self.next_slot;
        self.next_slot = (self.next_slot + 1) % ID_RING;
        let fits = self.ids[slot].as_ref().is_some_and(|s| s.host.len() >= ids.len());
        if !fits {
            let cap = ids.len().next_power_of_two();
            // SAFETY: the pinned buffer is fully written (zeros, then the ids) before any copy reads it.
            let mut host =
                unsafe { self.ctx.alloc_pinned::<u32>(cap) }.map_err(driver_err("allocating pinned block ids"))?;
            host.as_mut_slice().map_err(driver_err("pinned block ids"))?.fill(0);
            let dev = self.stream.alloc_zeros::<u32>(cap).map_err(driver_err("allocating device block ids"))?;
            self.ids[slot] = Some(IdSlot { host, dev });
        }
        let IdSlot { host, dev } = self.ids[slot].as_mut().expect("just ensured");
        // Waits only for this slot's previous upload, `ID_RING` layers ago.
        let h = host.as_mut_slice().map_err(driver_err("pinned block ids"))?;
        h[..ids.len()].copy_from_slice(ids);
        self.stream.memcpy_htod(host, dev).map_err(driver_err("uploading block ids"))?;
        Ok(slot)
    }
}

fn launch_config(plan: &LaunchPlan) -> LaunchConfig {
    LaunchConfig { grid_dim: plan.cfg, block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::KvDtypeWire;

    fn layout() -> KvLayout {
        KvLayout { n_layers: 2, n_kv_heads: 8, head_dim: 128, block_size: 16, dtype: KvDtypeWire::F16, fingerprint: 1 }
    }

    /// Set to `1` by `scripts/test.sh` after its set-up scripts: the tools they install
    /// (here NVRTC, from `.venv-cuda`) are then expected, and a missing one is a failure.
    const REQUIRE_TOOLS: &str = "TANDEM_REQUIRE_TOOLS";

    /// Writes to the process's stderr, past the test harness's capture, so a skip shows
    /// in a plain `cargo test`.
    fn say(msg: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "{msg}");
    }

    /// The no-GPU path: without the CUDA driver (the case on CI, which has no GPU) both
    /// roles' constructors return `Unavailable` rather than panicking. Where the driver,
    /// NVRTC and NCCL all load, i.e. on a GPU machine, it is skipped with a line on
    /// stderr: `new` would wait for a peer on a made-up id. No test here runs the
    /// transport on a device.
    #[test]
    fn constructing_without_cuda_is_unavailable_not_a_panic() {
        if check_libraries().is_ok() {
            say("skipped: CUDA, NVRTC and NCCL are all present; not joining a communicator with no peer");
            return;
        }
        let got =
            std::panic::catch_unwind(|| NcclTransport::new(0, Role::Prefill, &[0u8; NCCL_ID_LEN], layout()).err());
        let err = got.expect("NcclTransport::new panicked").expect("NcclTransport::new succeeded without CUDA");
        assert!(matches!(err, NcclError::Unavailable(_)), "{err:?}");
        let decode = NcclTransport::new(0, Role::Decode, &[0u8; NCCL_ID_LEN], layout()).err().unwrap();
        assert!(matches!(decode, NcclError::Unavailable(_)), "{decode:?}");
    }

    #[test]
    fn unique_id_without_nccl_is_unavailable() {
        // SAFETY: see `check_libraries`.
        if unsafe { cudarc::nccl::sys::is_culib_present() } {
            assert_eq!(new_unique_id().map(|id| id.len()), Ok(NCCL_ID_LEN));
        } else {
            assert!(matches!(new_unique_id(), Err(NcclError::Unavailable(_))));
        }
    }

    #[test]
    fn id_bytes_round_trip_and_are_length_checked() {
        let bytes: Vec<u8> = (0..NCCL_ID_LEN as u32).map(|i| (i * 7 + 200) as u8).collect();
        let id = id_from_bytes(&bytes).unwrap();
        let back: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        assert_eq!(back, bytes);
        assert!(matches!(id_from_bytes(&bytes[1..]), Err(NcclError::Invalid(_))));
    }

    #[test]
    fn launch_plans_pick_the_widest_word() {
        let l = layout();
        let hbb = l.half_block_bytes(); // 16 * 8 * 128 * 2 = 32 KiB
        let p = plan_launch(hbb, 3, true).unwrap();
        assert_eq!(p, LaunchPlan { vec16: true, words: (hbb / 16) as u64, cfg: (8, 3, 2) });
        let p = plan_launch(hbb, 3, false).unwrap();
        assert_eq!((p.vec16, p.words, p.cfg), (false, (hbb / 2) as u64, (64, 3, 2)));
        // head_dim 4, one head, block 2: 16 bytes; 6 bytes forces 16-bit words.
        assert!(plan_launch(16, 1, true).unwrap().vec16);
        assert!(!plan_launch(6, 1, true).unwrap().vec16);
        assert!(plan_launch(7, 1, true).is_err());
        assert!(plan_launch(hbb, 0, true).is_err());
        // The grid's y dimension is capped; the kernel loops over the rest.
        assert_eq!(plan_launch(hbb, 100_000, true).unwrap().cfg.1, 65_535);
    }

    #[test]
    fn block_ids_are_checked_before_any_launch() {
        assert!(validate_ids(&[BlockId(0), BlockId(5), BlockId(9)], 10, true).is_ok());
        assert!(validate_ids(&[BlockId(3), BlockId(3)], 10, false).is_ok());
        assert!(matches!(validate_ids(&[BlockId(3), BlockId(3)], 10, true), Err(NcclError::Invalid(_))));
        assert!(matches!(validate_ids(&[BlockId(10)], 10, false), Err(NcclError::Invalid(_))));
        assert!(matches!(validate_ids(&[], 10, false), Err(NcclError::Invalid(_))));
        assert_eq!(cache_blocks("K", 3 * 64, 64), Ok(3));
        assert!(cache_blocks("K", 3 * 64 + 2, 64).is_err());
        assert_eq!(payload_bytes(&layout(), 3), 3 * layout().layer_block_bytes());
    }

    /// The embedded kernels compile to PTX through cudarc's NVRTC binding (no GPU
    /// needed). Needs libnvrtc on the loader path, e.g.
    /// `LD_LIBRARY_PATH=<.venv-cuda site-packages>/nvidia/cuda_nvrtc/lib`, which
    /// `scripts/test.sh` sets. Without it: a failure when [`REQUIRE_TOOLS`] is `1`, else
    /// a skip said on stderr.
    #[test]
    fn embedded_kernels_compile_when_nvrtc_is_loadable() {
        match compile_kernels(Some((8, 0))) {
            Err(NcclError::Unavailable(why)) => {
                assert!(
                    std::env::var_os(REQUIRE_TOOLS).is_none_or(|v| v != "1"),
                    "{REQUIRE_TOOLS}=1, but {why}: put <.venv-cuda site-packages>/nvidia/cuda_nvrtc/lib \
                     on LD_LIBRARY_PATH (scripts/setup-cuda-tools.sh installs it)"
                );
                say(&format!("skipped: {why} (put .venv-cuda's nvidia/cuda_nvrtc/lib on LD_LIBRARY_PATH)"));
            }
            Err(e) => panic!("{e}"),
            Ok(ptx) => {
                let src = ptx.to_src();
                for name in
                    ["gather_kv_blocks", "scatter_kv_blocks", "gather_kv_blocks_vec16", "scatter_kv_blocks_vec16"]
                {
                    assert!(src.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
                }
            }
        }
    }
}
