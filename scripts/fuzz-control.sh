#!/usr/bin/env bash
# Fuzzes the decoding of the control plane's gRPC requests (tandem.v1 and
# tandem.worker.v1, through the servers' codec path) and the router's validation of a
# decoded GenerateRequest (proto/fuzz, target control_messages) for a bounded time and
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
# proto/fuzz/{corpus,artifacts} (git-ignored). Exits non-zero on a failed check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

SECS=${1:-60}
ENGINE=${FUZZ_ENGINE:-auto}
SEED=${FUZZ_SEED:-24301}
export CARGO_TARGET_DIR="$ROOT/target/fuzz"
FUZZ_DIR="$ROOT/proto/fuzz"
CORPUS="$FUZZ_DIR/corpus/control_messages"

stable_bin() {
    (cd "$FUZZ_DIR" && cargo build --quiet --release --no-default-features --bin control_messages_stable)
    echo "$CARGO_TARGET_DIR/release/control_messages_stable"
}

run_stable() {
    local bin
    bin=$(stable_bin)
    echo "fuzz-control: engine stable (seeded mutation loop), ${SECS}s, seed $SEED"
    local args=(--seconds "$SECS" --seed "$SEED")
    [ -d "$CORPUS" ] && args+=(--corpus "$CORPUS")
    local out
    out=$(cd "$FUZZ_DIR" && "$bin" "${args[@]}") || { echo "$out"; exit 1; }
    echo "$out"
    echo "fuzz-control: executions: $(echo "$out" | sed -n 's/^executions: //p' | tail -1) (stable)"
}

have_cargo_fuzz() { cargo fuzz --version >/dev/null 2>&1; }

if [ "$ENGINE" != stable ] && ! have_cargo_fuzz; then
    if [ "$ENGINE" = libfuzzer ] || [ "${FUZZ_INSTALL:-0}" = 1 ]; then
        echo "fuzz-control: installing cargo-fuzz"
        cargo install cargo-fuzz --locked || { echo "fuzz-control: cannot install cargo-fuzz" >&2; [ "$ENGINE" = libfuzzer ] && exit 1; }
    else
        echo "fuzz-control: cargo-fuzz is not installed (cargo install cargo-fuzz --locked, or FUZZ_INSTALL=1); using the stable engine"
        ENGINE=stable
    fi
fi

if [ "$ENGINE" = stable ]; then
    run_stable
    exit 0
fi

if [ "${FUZZ_TOOLCHAIN:-}" = nightly ]; then
    FUZZ=(cargo +nightly fuzz)
else
    # libFuzzer needs -Z flags (sanitizer, coverage passes): allowed on stable by this.
    export RUSTC_BOOTSTRAP=1
    FUZZ=(cargo fuzz)
fi

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
cd "$ROOT/proto"
if ! "${FUZZ[@]}" build control_messages >"$LOG" 2>&1; then
    tail -20 "$LOG" >&2
    if [ "$ENGINE" = libfuzzer ]; then
        echo "fuzz-control: the libFuzzer build failed" >&2
        exit 1
    fi
    echo "fuzz-control: the libFuzzer build failed; using the stable engine"
    cd "$ROOT"
    run_stable
    exit 0
fi

if [ ! -d "$CORPUS" ] || [ -z "$(ls -A "$CORPUS" 2>/dev/null)" ]; then
    "$(stable_bin)" --write-seeds "$CORPUS"
fi

echo "fuzz-control: engine libFuzzer (${FUZZ[*]}), ${SECS}s"
set +e
"${FUZZ[@]}" run control_messages "$CORPUS" -- \
    -max_total_time="$SECS" -max_len=65536 -rss_limit_mb=4096 -print_final_stats=1 2>&1 | tee "$LOG" | grep -E "^(#[0-9]+\s+(INITED|DONE|pulse))|ERROR|panicked|Test unit written|^Done" || true
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    tail -40 "$LOG" >&2
    echo "fuzz-control: libFuzzer exited with $status (a failed check? see proto/fuzz/artifacts/)" >&2
    exit "$status"
fi
EXECS=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOG" | tail -1)
[ -n "$EXECS" ] || EXECS=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$LOG" | tail -1)
COV=$(grep -E "^#[0-9]+\s+DONE" "$LOG" | tail -1 | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
echo "fuzz-control: executions: ${EXECS:-unknown} (libFuzzer; coverage ${COV:-?} edges, corpus $(ls "$CORPUS" | wc -l) inputs)"
