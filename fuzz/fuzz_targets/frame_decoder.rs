//! libFuzzer target: arbitrary bytes into `wire::decode` (see `tandem_fuzz::frames::check`),
//! as given and with its header repaired to match its body (length, CRC32C).
//!
//!   cargo +nightly fuzz run frame_decoder            # with a nightly toolchain
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run frame_decoder   # with stable
//!
//! or scripts/fuzz-kvtransfer.sh, which picks whichever works.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_fuzz::frames::check_raw_and_repaired(data);
});
