//! A prefill request's KV, from the engine's step hook to a transfer session.
//!
//! [`SessionSink`] is the engine-thread half: it gathers the blocks each step
//! completes, layer by layer, into recycled buffers and hands them to the async
//! half, a task that owns the [`SendSession`] and writes them to the decode
//! worker's reserved blocks. The bounded queue between them is the only place
//! the compute thread can wait for the network.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tandem_engine::kv_cache::BlockId;
use tandem_engine::kv_cache::LayerKvBytes;
use tandem_engine::llm_engine::KvExport;
use tandem_kvtransfer::{BufferPool, SendSession, TransferError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::actor::ExportSink;

/// Layers queued before the compute thread waits.
const QUEUE_LAYERS: usize = 8;

type Layer = (u16, Vec<BlockId>, Vec<u8>);

/// The engine-thread half of one request's export.
pub struct SessionSink {
    tx: mpsc::Sender<Layer>,
    buffers: BufferPool,
    /// The decode worker's blocks for the prompt, in table order.
    dst: Vec<BlockId>,
    /// Leading blocks of `dst` the decode worker already holds (its prefix cache): not sent.
    skip: usize,
    /// When the first layer was handed over (the prefill left the queue).
    started: Arc<OnceLock<Instant>>,
}

/// The async half: resolves to the session once every queued layer is sent.
pub type SendTask = JoinHandle<Result<SendSession, TransferError>>;

/// Splits `session` into the engine-side sink and the sending task (spawned on `rt`).
/// `dst` are the receiver's blocks for the whole prompt, of which it holds the first
/// `skip` already.
pub fn start_export(
    rt: &tokio::runtime::Handle,
    mut session: SendSession,
    dst: Vec<BlockId>,
    skip: usize,
) -> (SessionSink, SendTask, Arc<OnceLock<Instant>>) {
    let (tx, mut rx) = mpsc::channel::<Layer>(QUEUE_LAYERS);
    let buffers = session.buffers();
    let task = rt.spawn(async move {
        while let Some((layer, blocks, payload)) = rx.recv().await {
            session.send_layer(layer, &blocks, payload).await?;
        }
        Ok(session)
    });
    let started = Arc::new(OnceLock::new());
    (SessionSink { tx, buffers, dst, skip, started: started.clone() }, task, started)
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
        let src = &e.blocks[first - e.first..];
        let mut payload = self.buffers.take();
        payload.reserve(src.len() * 2 * kv.half_block_bytes);
        kv.gather(src, &mut payload);
        // A closed queue means the session already failed; the task's result says why.
        let _ = self.tx.blocking_send((layer as u16, dst.to_vec(), payload));
    }
}
