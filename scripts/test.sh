#!/usr/bin/env bash
# The project's test command (README, CI): fetch what the tests need, then run them all.
# Idempotent; safe to run on a fresh machine with Rust, Python 3 and pip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/fetch-model.sh
cargo test --workspace --locked "$@"
