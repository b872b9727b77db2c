//! A prefill's KV, from the compute thread to a transfer session: the one layer
//! shipper.
//!
//! The compute-thread half ([`Outbox`]) gathers each layer's blocks (one copy out of
//! the cache, into recycled buffers) and hands them to the async half, a task that
//! owns the [`SendSession`] and writes them to the decode worker's reserved blocks.
//! The bounded queue between them is the only place the compute thread can wait for
//! the network, so layer L travels while layer L+1 computes.
//!
//! Two front ends share it: [`SessionSink`], the engine step hook's end of a
//! `Prefill` (blocks computed step by step, the destination's cached prefix skipped),
//! and [`LayerShipper`], the same for a single forward pass (tests, benchmarks).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tandem_engine::kv_cache::{BlockId, LayerKvBytes};
use tandem_engine::llm_engine::KvExport;
use tandem_kvtransfer::{BufferPool, SendSession, TransferError};
use tandem_worker_runtime::ExportSink;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Layers queued before the compute thread waits.
const QUEUE_LAYERS: usize = 8;

/// One layer of some blocks: the layer, the destination's block ids, their K and V.
type Layer = (u16, Vec<BlockId>, Vec<u8>);

/// The async half: resolves to the session once every queued layer is sent.
pub type SendTask = JoinHandle<Result<SendSession, TransferError>>;

/// The compute-thread half of one session's sending.
struct Outbox {
    tx: mpsc::Sender<Layer>,
    buffers: BufferPool,
}

impl Outbox {
    /// Starts the sending task for `session` on `rt`.
    fn start(rt: &tokio::runtime::Handle, mut session: SendSession) -> (Outbox, SendTask) {
        let (tx, mut rx) = mpsc::channel::<Layer>(QUEUE_LAYERS);
        let buffers = session.buffers();
        // Its handle goes to the caller, who awaits it; dropped, the task still ends as soon
        // as the queue closes (the sink or the shipper dropped), sending Abort as it goes.
        let task = rt.spawn(async move {
            while let Some((layer, blocks, payload)) = rx.recv().await {
                session.send_layer(layer, &blocks, payload).await?;
            }
            Ok(session)
        });
        (Outbox { tx, buffers }, task)
    }

    /// Gathers `src`'s blocks of `layer` from `kv` and queues them for the destination's
    /// blocks `dst` (same order). Returns the bytes queued. Call from the compute thread,
    /// never from the runtime.
    fn ship(&self, layer: usize, src: &[BlockId], dst: Vec<BlockId>, kv: &LayerKvBytes<'_>) -> usize {
        // A recycled buffer: no fresh pages to fault in for every layer.
        let mut payload = self.buffers.take();
        payload.reserve(src.len() * 2 * kv.half_block_bytes);
        kv.gather(src, &mut payload);
        let bytes = payload.len();
        // A closed queue means the session already failed; the task's result says why.
        let _ = self.tx.blocking_send((layer as u16, dst, payload));
        bytes
    }
}

/// The engine-thread half of one request's export.
pub struct SessionSink {
    outbox: Outbox,
    /// The decode worker's blocks for the prompt, in table order.
    dst: Vec<BlockId>,
    /// Leading blocks of `dst` the decode worker already holds (its prefix cache): not sent.
    skip: usize,
    /// When the first layer was handed over (the prefill left the queue).
    started: Arc<OnceLock<Instant>>,
}

/// Splits `session` into the engine-side sink and the sending task (spawned on `rt`).
/// `dst` are the receiver's blocks for the whole prompt, of which it holds the first
/// `skip` already.
pub fn start_export(
    rt: &tokio::runtime::Handle,
    session: SendSession,
    dst: Vec<BlockId>,
    skip: usize,
) -> (SessionSink, SendTask, Arc<OnceLock<Instant>>) {
    let (outbox, task) = Outbox::start(rt, session);
    let started = Arc::new(OnceLock::new());
    (SessionSink { outbox, dst, skip, started: started.clone() }, task, started)
}

impl ExportSink for SessionSink {
    fn on_layer(&mut self, e: &KvExport, layer: usize, kv: &LayerKvBytes<'_>) {
        self.started.get_or_init(Instant::now);
        let end = e.first + e.blocks.len();
        let first = e.first.max(self.skip);
        if first >= end {
            // All of these the destination holds already.
            return;
        }
        let Some(dst) = self.dst.get(first..end) else {
            // More blocks than the reservation: the final frame's check reports it.
            return;
        };
        self.outbox.ship(layer, &e.blocks[first - e.first..], dst.to_vec(), kv);
    }
}

/// Ships every layer of a fixed set of blocks as a single forward pass writes them.
pub struct LayerShipper {
    outbox: Outbox,
    src: Vec<BlockId>,
    dst: Vec<BlockId>,
    task: SendTask,
    /// Bytes handed to the sender so far.
    pub bytes: usize,
}

impl LayerShipper {
    /// Starts the sending task on `rt` for a session whose destination blocks are `dst`,
    /// shipping the source blocks `src` (same order) of every layer.
    pub fn start(
        rt: &tokio::runtime::Handle,
        session: SendSession,
        src: Vec<BlockId>,
        dst: Vec<BlockId>,
    ) -> LayerShipper {
        let (outbox, task) = Outbox::start(rt, session);
        LayerShipper { outbox, src, dst, task, bytes: 0 }
    }

    /// The forward pass's per-layer hook. Call from the compute thread, never from the runtime.
    pub fn on_layer(&mut self, layer: usize, kv: LayerKvBytes<'_>) {
        self.bytes += self.outbox.ship(layer, &self.src, self.dst.clone(), &kv);
    }

    /// After the forward pass: sends the final frame with the first sampled token and waits
    /// for the receiver's verdict. Call from the compute thread.
    pub fn finish(self, rt: &tokio::runtime::Handle, first_token: u32, num_tokens: u32) -> Result<(), TransferError> {
        let LayerShipper { outbox, task, .. } = self;
        // Closing the queue ends the task once it has sent what is queued.
        drop(outbox);
        rt.block_on(async move {
            let session = task.await.map_err(|e| TransferError::Protocol(format!("sender task: {e}")))??;
            session.finish(first_token, num_tokens).await
        })
    }
}

// Dropping a LayerShipper or a SessionSink closes the queue, which ends the task; the
// session's own Drop then sends Abort, so the receiver frees its blocks at once.
