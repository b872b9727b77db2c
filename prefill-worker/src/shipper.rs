//! Ships each layer's KV as soon as the forward pass has written it.
//!
//! The hook runs on the compute thread: it gathers the layer's blocks (one
//! copy out of the cache) and hands them to an async task that owns the
//! transfer session, through a bounded channel (backpressure: compute waits
//! only if the network falls a whole queue behind). The compute thread never
//! waits for the network otherwise, so layer L travels while layer L+1 computes.

use tandem_engine::kv_cache::BlockId;
use tandem_engine::kv_cache::LayerKvBytes;
use tandem_kvtransfer::{SendSession, TransferError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The transfer layout of `model`'s KV cache with f16 blocks of `block_size` tokens.
pub fn kv_layout(model: &tandem_engine::model::Model, block_size: usize) -> tandem_kvtransfer::KvLayout {
    let c = &model.config;
    tandem_kvtransfer::KvLayout {
        n_layers: c.n_layers as u16,
        n_kv_heads: c.n_kv_heads as u16,
        head_dim: c.head_dim as u16,
        block_size: block_size as u16,
        dtype: tandem_kvtransfer::KvDtypeWire::F16,
        fingerprint: c.fingerprint(),
    }
}

/// Layers queued before the compute thread waits.
const QUEUE_LAYERS: usize = 8;

pub struct LayerShipper {
    tx: Option<mpsc::Sender<(u16, Vec<u8>)>>,
    buffers: tandem_kvtransfer::BufferPool,
    src: Vec<BlockId>,
    task: JoinHandle<Result<SendSession, TransferError>>,
    /// Bytes handed to the sender so far.
    pub bytes: usize,
}

impl LayerShipper {
    /// Starts the sending task on `rt` for a session whose destination blocks are `dst`,
    /// shipping the source blocks `src` (same order) of every layer.
    pub fn start(
        rt: &tokio::runtime::Handle,
        mut session: SendSession,
        src: Vec<BlockId>,
        dst: Vec<BlockId>,
    ) -> LayerShipper {
        let (tx, mut rx) = mpsc::channel::<(u16, Vec<u8>)>(QUEUE_LAYERS);
        let buffers = session.buffers();
        let task = rt.spawn(async move {
            while let Some((layer, payload)) = rx.recv().await {
                session.send_layer(layer, &dst, payload).await?;
            }
            Ok(session)
        });
        LayerShipper { tx: Some(tx), buffers, src, task, bytes: 0 }
    }

    /// The forward pass's per-layer hook. Call from the compute thread, never from the runtime.
    pub fn on_layer(&mut self, layer: usize, kv: LayerKvBytes<'_>) {
        // A recycled buffer: no fresh pages to fault in for every layer.
        let mut payload = self.buffers.take();
        payload.reserve(self.src.len() * 2 * kv.half_block_bytes);
        kv.gather(&self.src, &mut payload);
        self.bytes += payload.len();
        if let Some(tx) = &self.tx {
            // A closed channel means the session already failed; `finish` reports why.
            let _ = tx.blocking_send((layer as u16, payload));
        }
    }

    /// After the forward pass: sends the final frame with the first sampled token and waits
    /// for the receiver's verdict. Call from the compute thread.
    pub fn finish(self, rt: &tokio::runtime::Handle, first_token: u32, num_tokens: u32) -> Result<(), TransferError> {
        let LayerShipper { tx, task, .. } = self;
        drop(tx);
        rt.block_on(async move {
            let session = task.await.map_err(|e| TransferError::Protocol(format!("sender task: {e}")))??;
            session.finish(first_token, num_tokens).await
        })
    }
}

// Dropping a LayerShipper closes the channel, which ends the task; the session's own
// Drop then sends Abort, so the receiver frees its blocks at once.
