//! # tandem-prefill-worker
//!
//! The engine in the prefill role: it computes prompts and ships their KV to
//! decode workers layer by layer, while the forward pass is still computing the
//! next layers.
//!
//! ## Layout
//! - `actor`: `EngineHandle`, the engine on its own thread behind a message queue
//!   (shared by every role: the decode worker runs the same actor).
//! - `export`: `SessionSink`, the step hook's end of a KV transfer session.
//! - `shipper`: `LayerShipper`, the same for a single forward pass (tests, benchmarks).

pub mod actor;
pub mod export;
pub mod shipper;

pub use actor::{Admission, Admitted, EngineHandle, Event, ExportSink, Load};
pub use export::{start_export, SendTask, SessionSink};
pub use shipper::{kv_layout, LayerShipper};
