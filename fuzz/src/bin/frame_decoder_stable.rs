//! The `frame_decoder` fuzz target on stable Rust, without libFuzzer: the shared loop of
//! `tandem_fuzz::stable` over structure-aware mutations of valid frames;
//! mutated inputs that still decode to a frame join the pool.

use tandem_fuzz::frames::{check, mutate, seeds};
use tandem_fuzz::stable;
use tandem_kvtransfer::wire;

fn main() {
    stable::main(stable::Target {
        name: "frame_decoder_stable",
        seeds: seeds(),
        mutate,
        check,
        keep: |buf| matches!(wire::decode(buf, usize::MAX, 32), Ok(Some(_))),
    });
}
