#!/usr/bin/env bash
# Serving comparison on this machine, one sitting, the same GGUF and the same seeded traces:
#   disagg   Tandem disaggregated: router + prefill worker pinned to core 0 + decode worker
#            pinned to core 1 (separate processes, a throwaway etcd on loopback)
#   agg      Tandem aggregated: `tandem up --prefill-workers 0` (one role-both worker, 2 threads)
#   llama    llama.cpp's llama-server (2 threads, 16 parallel slots, continuous batching,
#            -fa off), when its binary exists; skipped with a message otherwise
#   nocache  (shared-prefix only) disagg with the prefix cache off
# For each workload it sweeps request rates with `tandem bench serve` (open loop) and
# records one JSON line per run; the summary gives, per server, the highest rate at which
# at least 90% of requests met the workload's SLOs, and the goodput there.
#
#   scripts/compare-serving.sh [--model smollm2-135m|qwen2.5-coder-0.5b|PATH] [--llama-server PATH]
#                              [--out DIR] [--workloads "chat summarize shared-prefix"]
#
# Bounded: each run sends a fixed number of requests and stops after --timeout. Every
# process it starts is stopped when it exits. Needs: a release build (it builds one),
# etcd (scripts/setup-etcd.sh), taskset.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LLAMA_SERVER=.ref/bin/llama-server
OUT=target/compare-serving
WORKLOADS="chat summarize shared-prefix"
MODEL=smollm2-135m
while [ $# -gt 0 ]; do
    case "$1" in
        --llama-server) LLAMA_SERVER="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --workloads) WORKLOADS="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        *) echo "usage: $0 [--model NAME|PATH] [--llama-server PATH] [--out DIR] [--workloads LIST]" >&2; exit 2 ;;
    esac
done

case "$MODEL" in
    smollm2-135m) scripts/fetch-model.sh smollm2-135m >/dev/null; MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf ;;
    qwen2.5-coder-0.5b)
        scripts/fetch-model.sh qwen2.5-coder-0.5b >/dev/null
        MODEL=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
        ;;
esac
[ -f "$MODEL" ] || { echo "compare-serving: no model file $MODEL" >&2; exit 1; }
scripts/setup-etcd.sh >/dev/null
command -v taskset >/dev/null || { echo "compare-serving: taskset (util-linux) is needed" >&2; exit 1; }
cargo build --release --locked -p tandem >/dev/null 2>&1 || cargo build --release --locked -p tandem
T=target/release/tandem
mkdir -p "$OUT"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${PIDS[@]:-}"; do kill -KILL "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits until FILE has a line matching PATTERN (30 s at most).
wait_for() {
    for _ in $(seq 1 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "compare-serving: timed out waiting for '$2' in $1" >&2
    cat "$1" >&2
    return 1
}

stop_all() {
    for p in "${PIDS[@]:-}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}

# Starts a server; sets TARGET and API.
start_disagg() {
    local extra=("$@") cp pp
    cp=$(free_port); pp=$(free_port)
    etcd --data-dir "$WORK/etcd-$cp" --listen-client-urls "http://127.0.0.1:$cp" \
        --advertise-client-urls "http://127.0.0.1:$cp" --listen-peer-urls "http://127.0.0.1:$pp" \
        >"$WORK/etcd.log" 2>&1 &
    PIDS+=($!)
    wait_for "$WORK/etcd.log" "ready to serve client requests"
    local common=(--model "$MODEL" --etcd "http://127.0.0.1:$cp" --cluster compare)
    taskset -c 0 "$T" prefill "${common[@]}" --id prefill-0 --threads 1 "${extra[@]}" >"$WORK/prefill.log" 2>&1 &
    PIDS+=($!)
    taskset -c 1 "$T" decode "${common[@]}" --id decode-0 --threads 1 "${extra[@]}" >"$WORK/decode.log" 2>&1 &
    PIDS+=($!)
    wait_for "$WORK/prefill.log" "tandem: ready"
    wait_for "$WORK/decode.log" "tandem: ready"
    "$T" router "${common[@]}" --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$WORK/router.log" 2>&1 &
    PIDS+=($!)
    wait_for "$WORK/router.log" "worker joined worker=decode-0 role="
    wait_for "$WORK/router.log" "worker joined worker=prefill-0 role="
    TARGET=$(sed -n 's/^tandem: router grpc \([^ ]*\).*/\1/p' "$WORK/router.log")
    API=grpc
}

start_agg() {
    "$T" up --model "$MODEL" --prefill-workers 0 --threads-per-worker 2 --grpc-port 0 --http-port 0 \
        >"$WORK/up.log" 2>&1 &
    PIDS+=($!)
    wait_for "$WORK/up.log" "tandem: ready"
    TARGET=$(sed -n 's/^tandem: router grpc \([^ ]*\).*/\1/p' "$WORK/up.log")
    API=grpc
}

start_llama() {
    local port
    port=$(free_port)
    "$LLAMA_SERVER" -m "$MODEL" -t 2 -np 16 -cb -fa off -c 32768 --host 127.0.0.1 --port "$port" \
        >"$WORK/llama.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        sleep 0.1
    done
    TARGET="http://127.0.0.1:$port"
    API=openai
}

# Per workload: rates, requests per run, SLOs (TTFT ms, TPOT ms).
params() {
    case "$1" in
        chat) RATES="1,2,4,6,8"; N=48; SLO_TTFT=1000; SLO_TPOT=100 ;;
        summarize) RATES="0.25,0.5,0.75,1"; N=24; SLO_TTFT=5000; SLO_TPOT=30 ;;
        shared-prefix) RATES="1,2,4,6"; N=48; SLO_TTFT=1000; SLO_TPOT=100 ;;
        *) echo "unknown workload $1" >&2; exit 2 ;;
    esac
}

bench() { # server workload
    params "$2"
    echo "== $1 / $2: rates $RATES, $N requests each, SLO TTFT ${SLO_TTFT} ms, TPOT ${SLO_TPOT} ms" >&2
    "$T" bench serve --target "$TARGET" --api "$API" --workload "$2" --rate "$RATES" --requests "$N" \
        --slo-ttft-ms "$SLO_TTFT" --slo-tpot-ms "$SLO_TPOT" --seed 7 --timeout 300 --json \
        --plot "$OUT/$1-$2.png" | tee "$OUT/$1-$2.jsonl" >/dev/null
}

servers="disagg agg"
if [ -x "$LLAMA_SERVER" ]; then
    servers="$servers llama"
else
    echo "compare-serving: no llama-server at $LLAMA_SERVER: skipping it (build it from llama-cpp-python's sources or pass --llama-server)" >&2
fi

for s in $servers; do
    "start_$s"
    for w in $WORKLOADS; do bench "$s" "$w"; done
    stop_all
done
if [[ " $WORKLOADS " == *" shared-prefix "* ]]; then
    start_disagg --no-prefix-cache
    bench nocache shared-prefix
    stop_all
fi

# Summary: highest rate with >= 90% attainment, and the goodput and latencies there.
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'server':8} {'workload':14} {'best rate':>9} {'goodput':>8} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}")
for f in sorted(out.glob("*.jsonl")):
    server, workload = f.stem.split("-", 1)
    runs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    ok = [r for r in runs if r["slo_attainment"] >= 0.9]
    r = max(ok, key=lambda r: r["rate"]) if ok else min(runs, key=lambda r: r["rate"])
    best = f"{r['rate']:g}" if ok else "none"
    print(f"{server:8} {workload:14} {best:>9} {r['goodput_rps']:8.2f} {r['output_tok_s']:9.1f} "
          f"{r['ttft_ms']['p50']:9.0f} {r['ttft_ms']['p99']:9.0f} {r['tpot_ms']['p50']:9.1f} {r['tpot_ms']['p99']:9.1f}")
EOF
