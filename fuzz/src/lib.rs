//! Fuzzing of what a stranger's bytes reach first: the KV transfer wire codec
//! ([`frames`], target `frame_decoder`) and the control plane's request decoding with the
//! router's validation ([`control`], target `control_messages`). Each target has a
//! libFuzzer entry (`fuzz_targets/`, cargo fuzz) and a stable-Rust twin (`src/bin/*_stable.rs`)
//! that runs the same checks under the seeded mutation loop of [`stable`].
//!
//! Not a member of the main workspace (its own `[workspace]`): run it with
//! scripts/fuzz-kvtransfer.sh and scripts/fuzz-control.sh.

pub mod control;
pub mod frames;
pub mod stable;
