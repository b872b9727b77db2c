# shellcheck shell=bash
# The bounded fuzzing run shared by scripts/fuzz-*.sh: sourced with NAME (the log prefix),
# TARGET (a cargo-fuzz target of the fuzz/ crate; its stable-Rust twin is the bin
# TARGET_stable), ROOT (the repository) and the seconds as $1.
# See scripts/fuzz-kvtransfer.sh for the engines and the variables that choose them.

SECS=${1:-60}
ENGINE=${FUZZ_ENGINE:-auto}
SEED=${FUZZ_SEED:-24301}
export CARGO_TARGET_DIR="$ROOT/target/fuzz"
FUZZ_DIR="$ROOT/fuzz"
CORPUS="$FUZZ_DIR/corpus/$TARGET"

# The fuzz crate is its own workspace, and its Cargo.lock is git-ignored: start it from the
# workspace's (checked with --locked by scripts/test.sh), so the fuzzers build exactly the versions
# the workspace is tested with, in target/fuzz. Cargo only
# adds libfuzzer-sys and its dependencies, which the stable engine never compiles.
cp "$ROOT/Cargo.lock" "$FUZZ_DIR/Cargo.lock"

stable_bin() {
    # A failed build must not fall through to a stale binary from an earlier one.
    if ! (cd "$FUZZ_DIR" && cargo build --quiet --release --no-default-features --bin "${TARGET}_stable"); then
        echo "$NAME: building ${TARGET}_stable failed" >&2
        exit 1
    fi
    echo "$CARGO_TARGET_DIR/release/${TARGET}_stable"
}

run_stable() {
    local bin
    bin=$(stable_bin)
    echo "$NAME: engine stable (seeded mutation loop), ${SECS}s, seed $SEED"
    local args=(--seconds "$SECS" --seed "$SEED")
    [ -d "$CORPUS" ] && args+=(--corpus "$CORPUS")
    local out
    out=$(cd "$FUZZ_DIR" && "$bin" "${args[@]}") || { echo "$out"; exit 1; }
    echo "$out"
    echo "$NAME: executions: $(echo "$out" | sed -n 's/^executions: //p' | tail -1) (stable)"
}

have_cargo_fuzz() { cargo fuzz --version >/dev/null 2>&1; }

if [ "$ENGINE" != stable ] && ! have_cargo_fuzz; then
    if [ "$ENGINE" = libfuzzer ] || [ "${FUZZ_INSTALL:-0}" = 1 ]; then
        echo "$NAME: installing cargo-fuzz"
        cargo install cargo-fuzz --locked || { echo "$NAME: cannot install cargo-fuzz" >&2; [ "$ENGINE" = libfuzzer ] && exit 1; }
    else
        echo "$NAME: cargo-fuzz is not installed (cargo install cargo-fuzz --locked, or FUZZ_INSTALL=1); using the stable engine"
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
cd "$ROOT"
if ! "${FUZZ[@]}" build "$TARGET" >"$LOG" 2>&1; then
    tail -20 "$LOG" >&2
    if [ "$ENGINE" = libfuzzer ]; then
        echo "$NAME: the libFuzzer build failed" >&2
        exit 1
    fi
    echo "$NAME: the libFuzzer build failed; using the stable engine"
    cd "$ROOT"
    run_stable
    exit 0
fi

if [ ! -d "$CORPUS" ] || [ -z "$(ls -A "$CORPUS" 2>/dev/null)" ]; then
    "$(stable_bin)" --write-seeds "$CORPUS"
fi

echo "$NAME: engine libFuzzer (${FUZZ[*]}), ${SECS}s"
set +e
"${FUZZ[@]}" run "$TARGET" "$CORPUS" -- \
    -max_total_time="$SECS" -max_len=65536 -rss_limit_mb=4096 -print_final_stats=1 2>&1 | tee "$LOG" | grep -E "^(#[0-9]+\s+(INITED|DONE|pulse))|ERROR|panicked|Test unit written|^Done" || true
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    tail -40 "$LOG" >&2
    echo "$NAME: libFuzzer exited with $status (a failed check? see fuzz/artifacts/)" >&2
    exit "$status"
fi
EXECS=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOG" | tail -1)
[ -n "$EXECS" ] || EXECS=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$LOG" | tail -1)
COV=$(grep -E "^#[0-9]+\s+DONE" "$LOG" | tail -1 | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
echo "$NAME: executions: ${EXECS:-unknown} (libFuzzer; coverage ${COV:-?} edges, corpus $(ls "$CORPUS" | wc -l) inputs)"
