//! libFuzzer target: arbitrary bytes as every control request message, as a whole gRPC
//! request body, and (decoded as a `GenerateRequest`) through the router's validation;
//! see `tandem_fuzz::control::check`.
//!
//!   cargo +nightly fuzz run control_messages            # with a nightly toolchain
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run control_messages   # with stable
//!
//! or scripts/fuzz-control.sh, which picks whichever works.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_fuzz::control::check(data);
});
