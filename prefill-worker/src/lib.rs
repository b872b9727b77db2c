//! # tandem-prefill-worker
//!
//! Tandem's prefill role: it computes prompts and ships their KV to decode
//! workers layer by layer, while the forward pass is still computing the next
//! layers. The engine actor, the `Worker` service and the process around it are
//! the runtime's (`tandem-worker-runtime`); this crate never sees the decode role.
//!
//! ## Layout
//! - `role`: `PrefillWorker`, the `Prefill` handler (`PrefillWorker::build` is the
//!   role's `RoleBuilders` entry).
//! - `export`: the layer shipper: `SessionSink` (the engine step hook's end of a
//!   transfer session) and `LayerShipper` (the same for a single forward pass).
//! The decode workers a prefill may send KV to are checked by the runtime's `peers`.

pub mod export;
pub mod role;

pub use export::{start_export, LayerShipper, SendTask, SessionSink};
pub use role::PrefillWorker;
pub use tandem_worker_runtime::kv_layout;
