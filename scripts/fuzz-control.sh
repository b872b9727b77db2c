#!/usr/bin/env bash
# Fuzzes the decoding of the control plane's gRPC requests (tandem.v1 and
# tandem.worker.v1, through the servers' codec path) and the router's validation of a
# decoded GenerateRequest (fuzz/, target control_messages) for a bounded time and
# prints the number of executions reached. Validation runs against the model file
# (TANDEM_MODEL, default models/SmolLM2-135M-Instruct.Q4_1.gguf) when it is there.
#
#   scripts/fuzz-control.sh [SECONDS]        # default 60
#
# Engines (FUZZ_ENGINE=auto|libfuzzer|stable, default auto):
#   libfuzzer  cargo fuzz (libFuzzer + ASan, coverage-guided). Needs cargo-fuzz
#              (`cargo install cargo-fuzz --locked`; FUZZ_INSTALL=1 lets this script do it)
#              and nightly compiler flags: stable Rust with RUSTC_BOOTSTRAP=1 by default,
#              or FUZZ_TOOLCHAIN=nightly to use an installed nightly toolchain.
#   stable     the same checks in a seeded, structure-aware mutation loop on plain stable
#              Rust (bin control_messages_stable); FUZZ_SEED=N picks the seed.
#   auto       libfuzzer when cargo-fuzz is installed and the target builds, else stable.
#
# Build output goes to <repo>/target/fuzz; the corpus and crash artifacts to
# fuzz/{corpus,artifacts}/control_messages (git-ignored). Exits non-zero on a failed check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

NAME=fuzz-control TARGET=control_messages
# shellcheck source=scripts/lib/fuzz.sh
source "$ROOT/scripts/lib/fuzz.sh"
