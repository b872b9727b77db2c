//! The `control_messages` fuzz target on stable Rust, without libFuzzer: the shared loop
//! of `tandem_fuzz::stable` over mutations of valid encoded requests (see
//! `tandem_fuzz::control`); mutated inputs that still decode as a `GenerateRequest` join the
//! pool.

use prost::Message;
use tandem_fuzz::control::{check, facts, mutate, seeds};
use tandem_fuzz::stable;
use tandem_proto::tandem::v1 as api;

fn main() {
    println!("validation with the model: {}", if facts().is_some() { "yes" } else { "no (model file missing)" });
    stable::main(stable::Target {
        name: "control_messages_stable",
        seeds: seeds(),
        mutate,
        check,
        keep: |buf| api::GenerateRequest::decode(buf).is_ok(),
    });
}
