//! The `frame_decoder` fuzz target on stable Rust, without libFuzzer: the shared loop of
//! `tandem_kvtransfer_fuzz::stable` over structure-aware mutations of valid frames;
//! mutated inputs that still decode to a frame join the pool.

use tandem_kvtransfer::wire;
use tandem_kvtransfer_fuzz::{check, mutate, seeds, stable};

fn main() {
    stable::main(stable::Target {
        name: "frame_decoder_stable",
        seeds: seeds(),
        mutate,
        check,
        keep: |buf| matches!(wire::decode(buf, usize::MAX, 32), Ok(Some(_))),
    });
}
