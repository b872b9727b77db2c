#!/usr/bin/env bash
# The simulator against the real cluster on this machine (issue 23), one sitting: `tandem profile`
# measures the cost models (one kernel thread, as every worker here runs), then each cluster
# (1P1D, two role-both workers, 2P+2D; one thread per worker, worker i pinned to core i mod 2,
# KV over shared memory) serves seeded open-loop workloads with `tandem bench serve`, and
# `tandem sim` simulates the same requests on the same shape (--cores 2 --link shm). Every
# run's JSON goes to OUT/real.jsonl and OUT/sim.jsonl; the table of errors (TTFT p50/p90,
# TPOT p50/p90, goodput) and their median is printed and written to OUT/table.md.
#
#   scripts/validate-sim.sh [--out DIR] [--costs FILE] [--clusters "1p1d 2b 2p2d"] [--quick]
#
# --costs: use this profile instead of measuring one. --quick: a few requests per run, checks
# the plumbing, measures nothing. Bounded: every run sends a fixed number of requests with a
# timeout; every process it starts is stopped when it exits. Needs: a release build (it builds
# one), etcd (scripts/setup-etcd.sh), taskset, python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=target/validate-sim
COSTS=""
CLUSTERS="1p1d 2b 2p2d"
QUICK=0
usage() {
    echo "usage: $0 [--out DIR] [--costs FILE] [--clusters LIST] [--quick]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --costs) COSTS="$2"; shift 2 ;;
        --clusters) CLUSTERS="${2//,/ }"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) usage ;;
    esac
done

scripts/fetch-model.sh smollm2-135m >/dev/null
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
scripts/setup-etcd.sh >/dev/null
for tool in taskset python3; do
    command -v "$tool" >/dev/null || { echo "validate-sim: $tool is needed" >&2; exit 1; }
done
cargo build --release --locked -p tandem >/dev/null 2>&1 || cargo build --release --locked -p tandem
T=target/release/tandem

mkdir -p "$OUT/logs"
rm -f "$OUT/real.jsonl" "$OUT/sim.jsonl"
# shellcheck source=lib/procs.sh
source scripts/lib/procs.sh
procs_init validate-sim

if [ -z "$COSTS" ]; then
    COSTS="$OUT/costs.json"
    echo "== tandem profile --threads 1" >&2
    quick=()
    if [ "$QUICK" = 1 ]; then quick=(--quick); fi
    "$T" profile --model "$MODEL" --threads 1 "${quick[@]}" -o "$COSTS"
fi

# start CLUSTER: P prefill, D decode, B both workers, worker i on core i mod 2; sets TARGET.
start() {
    local p d b i=0 id
    case "$1" in
        1p1d) p=1; d=1; b=0 ;;
        2b) p=0; d=0; b=2 ;;
        2p2d) p=2; d=2; b=0 ;;
        *) echo "validate-sim: unknown cluster $1" >&2; exit 2 ;;
    esac
    SHAPE=(--prefill "$p" --decode "$d" --both "$b")
    rm -rf "$WORK"/*.log "$WORK"/etcd-*
    start_etcd
    local common=(--model "$MODEL" --etcd "$ETCD" --cluster validate-sim --threads 1)
    IDS=()
    for ((k = 0; k < p; k++)); do
        id=prefill-$k
        taskset -c $((i % 2)) "$T" prefill "${common[@]}" --id "$id" >"$WORK/$id.log" 2>&1 &
        PIDS+=($!); IDS+=("$id"); i=$((i + 1))
    done
    for ((k = 0; k < d; k++)); do
        id=decode-$k
        taskset -c $((i % 2)) "$T" decode "${common[@]}" --id "$id" >"$WORK/$id.log" 2>&1 &
        PIDS+=($!); IDS+=("$id"); i=$((i + 1))
    done
    for ((k = 0; k < b; k++)); do
        id=both-$k
        taskset -c $((i % 2)) "$T" decode "${common[@]}" --id "$id" --role both >"$WORK/$id.log" 2>&1 &
        PIDS+=($!); IDS+=("$id"); i=$((i + 1))
    done
    for id in "${IDS[@]}"; do wait_for "$WORK/$id.log" "tandem: ready"; done
    "$T" router --model "$MODEL" --etcd "$ETCD" --cluster validate-sim --grpc-listen 127.0.0.1:0 \
        --http-listen 127.0.0.1:0 >"$WORK/router.log" 2>&1 &
    PIDS+=($!)
    for id in "${IDS[@]}"; do wait_for "$WORK/router.log" "worker joined worker=$id role="; done
    TARGET=$(sed -n 's/^tandem: router grpc \([^ ]*\).*/\1/p' "$WORK/router.log")
}

# run CLUSTER LABEL BENCH-FLAGS...: the real run, then the simulated one, one JSON line each.
run() {
    local cluster="$1" label="$2" line
    shift 2
    echo "== $cluster / $label: $*" >&2
    start "$cluster"
    line=$(timeout 900 "$T" bench serve --target "$TARGET" --api grpc --timeout 600 --json "$@") ||
        echo "validate-sim: $cluster / $label failed" >&2
    stop_all
    for f in "$WORK"/*.log; do cp "$f" "$OUT/logs/$cluster-$label-$(basename "$f")"; done
    [ -n "$line" ] || return 0
    python3 -c 'import json,sys; v=json.loads(sys.argv[3].splitlines()[-1]); v["cluster"],v["label"]=sys.argv[1],sys.argv[2]; print(json.dumps(v))' \
        "$cluster" "$label" "$line" >>"$OUT/real.jsonl"
    line=$("$T" sim --costs "$COSTS" --model "$MODEL" "${SHAPE[@]}" --cores 2 --link shm --json "$@")
    python3 -c 'import json,sys; v=json.loads(sys.argv[3].splitlines()[-1]); v["cluster"],v["label"]=sys.argv[1],sys.argv[2]; print(json.dumps(v))' \
        "$cluster" "$label" "$line" >>"$OUT/sim.jsonl"
}

N=40
if [ "$QUICK" = 1 ]; then N=6; fi
for c in $CLUSTERS; do
    case "$c" in
        2p2d) scale=2 ;;
        *) scale=1 ;;
    esac
    # Chat prompts (~35 tokens, 32 out) lightly and at about two thirds of what the prefill side
    # serves here, and a ~600-token shared system prompt (16 out); objectives near the figures.
    run "$c" chat --workload chat --max-tokens 32 --requests "$N" --seed 11 \
        --rate "$(python3 -c "print(0.5 * $scale)")" --slo-ttft-ms 200 --slo-tpot-ms 15
    run "$c" chat-loaded --workload chat --max-tokens 32 --requests "$N" --seed 13 \
        --rate "$(python3 -c "print(2.0 * $scale)")" --slo-ttft-ms 300 --slo-tpot-ms 20
    run "$c" shared-prefix --workload shared-prefix --max-tokens 16 --requests "$N" --seed 12 \
        --rate "$(python3 -c "print(0.4 * $scale)")" --slo-ttft-ms 150 --slo-tpot-ms 20
done

python3 - "$OUT" <<'EOF' | tee "$OUT/table.md"
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
real = [json.loads(l) for l in open(out / "real.jsonl")]
sim = {(v["cluster"], v["label"]): v for v in map(json.loads, open(out / "sim.jsonl"))}
keys = [("TTFT p50", "ttft_ms", "p50"), ("TTFT p90", "ttft_ms", "p90"),
        ("TPOT p50", "tpot_ms", "p50"), ("TPOT p90", "tpot_ms", "p90"), ("goodput", "goodput_rps", None)]
def get(v, k, q):
    return v[k][q] if q else v[k]
print("| cluster | workload | " + " | ".join(f"{n} real / sim (error)" for n, _, _ in keys) + " |")
print("| --- | --- |" + " ---: |" * len(keys))
errors = {n: [] for n, _, _ in keys}
for r in real:
    s = sim.get((r["cluster"], r["label"]))
    if s is None:
        continue
    cells = []
    for n, k, q in keys:
        a, b = get(r, k, q), get(s, k, q)
        e = abs(b - a) / a if a else float("nan")
        errors[n].append(e)
        fmt = "{:.2f}" if q is None else "{:.0f}"
        cells.append(f"{fmt.format(a)} / {fmt.format(b)} ({e * 100:.0f}%)")
    print(f"| {r['cluster']} | {r['label']} | " + " | ".join(cells) + " |")
all_errors = [e for v in errors.values() for e in v if e == e]
print()
print("median error: " + ", ".join(f"{n} {statistics.median(v) * 100:.0f}%" for n, v in errors.items() if v)
      + (f"; all {statistics.median(all_errors) * 100:.1f}%" if all_errors else ""))
EOF
