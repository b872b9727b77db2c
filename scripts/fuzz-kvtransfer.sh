#!/usr/bin/env bash
# Fuzzes the KV transfer frame decoder (fuzz/, target frame_decoder) for a
# bounded time and prints the number of executions reached.
#
#   scripts/fuzz-kvtransfer.sh [SECONDS]        # default 60
#
# Engines (FUZZ_ENGINE=auto|libfuzzer|stable, default auto):
#   libfuzzer  cargo fuzz (libFuzzer + ASan, coverage-guided). Needs cargo-fuzz
#              (`cargo install cargo-fuzz --locked`; FUZZ_INSTALL=1 lets this script do it)
#              and nightly compiler flags: stable Rust with RUSTC_BOOTSTRAP=1 by default,
#              or FUZZ_TOOLCHAIN=nightly to use an installed nightly toolchain.
#   stable     the same checks in a seeded, structure-aware mutation loop on plain stable
#              Rust (bin frame_decoder_stable); FUZZ_SEED=N picks the seed.
#   auto       libfuzzer when cargo-fuzz is installed and the target builds, else stable.
#
# Build output goes to <repo>/target/fuzz; the corpus and crash artifacts to
# fuzz/{corpus,artifacts}/frame_decoder (git-ignored). Exits non-zero on a failed check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

NAME=fuzz-kvtransfer TARGET=frame_decoder
# shellcheck source=scripts/lib/fuzz.sh
source "$ROOT/scripts/lib/fuzz.sh"
