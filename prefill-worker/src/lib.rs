//! # tandem-prefill-worker
//!
//! The engine in the prefill role. What exists so far is the piece that makes
//! disaggregation pay: shipping a prompt's KV to the decode worker layer by
//! layer while the forward pass is still computing the next layers.
//!
//! ## Layout
//! - `shipper`: `LayerShipper`, the forward pass's per-layer hook feeding a KV transfer session.

pub mod shipper;

pub use shipper::{kv_layout, LayerShipper};
