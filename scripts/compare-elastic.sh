#!/usr/bin/env bash
# Elastic prefill/decode comparison on this machine's two cores, one sitting, the same GGUF and
# the same seeded traces. Four deployments, each worker its own process pinned to one core with
# --threads 1 (a throwaway etcd on loopback, a router unpinned):
#   agg      aggregated: two role-both workers (`tandem decode --role both`), no prefill worker
#   static   1P1D: a prefill worker (core 0) and a decode worker (core 1); every prompt is
#            prefilled remotely (router --prefill-placement remote)
#   perreq   1P1D with per-request disaggregation: the decode worker is role both and the router
#            decides per request where to prefill (--prefill-placement adaptive)
#   planner  the same two workers started --elastic, under the router's planner (--planner
#            --planner-dwell-s 10), which flips their roles as the load moves
# Workloads (`tandem bench serve --workload`): chat, summarize, shared-prefix, and phased (the
# first half summarize's long prompts and short outputs, the second half short prompts with long
# outputs; its figures are also reported per phase).
#
# Each run is one rate of one workload on a freshly started deployment (the planner starts from
# the same split, and no cache carries over), sent open loop by `tandem bench serve` with the
# seed a rate sweep would give it. Each run is one JSON line in OUT/DEPLOYMENT-WORKLOAD.jsonl:
# the bench's figures plus `deployment` and `router_metrics`, the router's
# tandem_planner_decisions_total and tandem_router_prefill_placement_total series at the run's
# end (the processes' logs go to OUT/logs). The summary gives per workload and deployment the
# highest rate at which at least 90% of requests met the SLOs, and there the goodput, rejection
# rate, output tok/s, TTFT p90 and TPOT p90, then the issue's ratios: perreq / agg output tok/s
# on chat, perreq / agg goodput on summarize, planner / the best fixed split's goodput on phased.
#
# SLOs (TTFT ms, TPOT ms): chat and shared-prefix 1000/100 and summarize 5000/30, as
# scripts/compare-serving.sh has them. phased 5000/100: each half is held to the looser objective
# of the workload it is made of. Its first half's ~940-token prompts cannot meet chat's 1 s TTFT
# once two of them queue on one core, and its second half's 128-256-token outputs decode in
# batches that cannot meet summarize's 30 ms TPOT; one pair, because the router's placement
# controller and planner steer by one pair (--slo-ttft-ms, --slo-tpot-ms, set to the workload's).
# Rates are compare-serving's, three each; phased's are summarize's, as its first half bounds it.
#
#   scripts/compare-elastic.sh [--model smollm2-135m|qwen2.5-coder-0.5b|PATH] [--out DIR]
#                              [--workloads "chat summarize shared-prefix phased"]
#                              [--deployments "agg static perreq planner"] [--quick]
#                              [--rates "R1 R2"] [--requests N]
#
# --rates / --requests: the same rates and request count for every workload given, in place of
# the workload's own (a slower or faster machine than the one the rates were chosen on).
# --quick: 4 requests per run at each workload's lowest rate only, a 60 s bound per run: checks
# the plumbing, measures nothing. Bounded: each run sends a fixed number of requests and stops
# after its timeout; every process it starts is stopped when it exits. Needs: a release build (it
# builds one), etcd (scripts/setup-etcd.sh), taskset, curl, python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=target/compare-elastic
WORKLOADS="chat summarize shared-prefix phased"
DEPLOYMENTS="agg static perreq planner"
MODEL=smollm2-135m
QUICK=0
RATES_OVERRIDE=""
N_OVERRIDE=""
usage() {
    echo "usage: $0 [--model NAME|PATH] [--out DIR] [--workloads LIST] [--deployments LIST] [--rates LIST] [--requests N] [--quick]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --workloads) WORKLOADS="${2//,/ }"; shift 2 ;;
        --deployments) DEPLOYMENTS="${2//,/ }"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --rates) RATES_OVERRIDE="${2//,/ }"; shift 2 ;;
        --requests) N_OVERRIDE="$2"; shift 2 ;;
        *) usage ;;
    esac
done
for d in $DEPLOYMENTS; do
    case "$d" in agg | static | perreq | planner) ;; *) echo "compare-elastic: unknown deployment $d" >&2; usage ;; esac
done

case "$MODEL" in
    smollm2-135m) scripts/fetch-model.sh smollm2-135m >/dev/null; MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf ;;
    qwen2.5-coder-0.5b)
        scripts/fetch-model.sh qwen2.5-coder-0.5b >/dev/null
        MODEL=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
        ;;
esac
[ -f "$MODEL" ] || { echo "compare-elastic: no model file $MODEL" >&2; exit 1; }
scripts/setup-etcd.sh >/dev/null
for tool in taskset curl python3; do
    command -v "$tool" >/dev/null || { echo "compare-elastic: $tool is needed" >&2; exit 1; }
done
cargo build --release --locked -p tandem >/dev/null 2>&1 || cargo build --release --locked -p tandem
T=target/release/tandem

# The router flags of issue 19. Every deployment but agg needs them; the router is given the
# SLOs whenever it takes them.
ROUTER_HELP=$("$T" router --help)
has_flag() { grep -q -- "$1" <<<"$ROUTER_HELP"; }
for d in $DEPLOYMENTS; do
    if [ "$d" != agg ] && ! has_flag --prefill-placement; then
        echo "compare-elastic: this tandem's router has no --prefill-placement: deployment $d needs it" >&2
        exit 1
    fi
done

mkdir -p "$OUT/logs"
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
    echo "compare-elastic: timed out waiting for '$2' in $1" >&2
    cat "$1" >&2
    return 1
}

# Stops every process started, each given 30 s to drain before it is killed.
stop_all() {
    for p in "${PIDS[@]:-}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do
        for _ in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
}

# Starts one worker pinned to a core: worker CORE ID SUBCOMMAND [FLAGS...].
worker() {
    local core="$1" id="$2"
    shift 2
    taskset -c "$core" "$T" "$@" "${COMMON[@]}" --id "$id" --threads 1 >"$WORK/$id.log" 2>&1 &
    PIDS+=($!)
}

# Starts DEPLOYMENT with the SLOs in SLO_TTFT and SLO_TPOT; sets TARGET (gRPC) and METRICS.
start() {
    local cp pp router_flags=() ids=()
    rm -rf "$WORK"/*.log "$WORK"/etcd-*
    cp=$(free_port)
    pp=$(free_port)
    etcd --data-dir "$WORK/etcd-$cp" --listen-client-urls "http://127.0.0.1:$cp" \
        --advertise-client-urls "http://127.0.0.1:$cp" --listen-peer-urls "http://127.0.0.1:$pp" \
        >"$WORK/etcd.log" 2>&1 &
    PIDS+=($!)
    wait_for "$WORK/etcd.log" "ready to serve client requests"
    COMMON=(--model "$MODEL" --etcd "http://127.0.0.1:$cp" --cluster compare-elastic)
    case "$1" in
        agg)
            worker 0 decode-0 decode --role both
            worker 1 decode-1 decode --role both
            ids=(decode-0 decode-1)
            ;;
        static)
            worker 0 prefill-0 prefill
            worker 1 decode-0 decode
            ids=(prefill-0 decode-0)
            router_flags=(--prefill-placement remote)
            ;;
        perreq)
            worker 0 prefill-0 prefill
            worker 1 decode-0 decode --role both
            ids=(prefill-0 decode-0)
            router_flags=(--prefill-placement adaptive)
            ;;
        planner)
            worker 0 prefill-0 prefill --elastic
            worker 1 decode-0 decode --role both --elastic
            ids=(prefill-0 decode-0)
            router_flags=(--planner --planner-dwell-s 10)
            ;;
    esac
    if has_flag --slo-ttft-ms; then router_flags+=(--slo-ttft-ms "$SLO_TTFT" --slo-tpot-ms "$SLO_TPOT"); fi
    for id in "${ids[@]}"; do wait_for "$WORK/$id.log" "tandem: ready"; done
    "$T" router "${COMMON[@]}" --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 "${router_flags[@]}" \
        >"$WORK/router.log" 2>&1 &
    PIDS+=($!)
    for id in "${ids[@]}"; do wait_for "$WORK/router.log" "worker joined worker=$id role="; done
    TARGET=$(sed -n 's/^tandem: router grpc \([^ ]*\).*/\1/p' "$WORK/router.log")
    METRICS="http://$(sed -n 's/^tandem: router grpc [^ ]* http \([^ ]*\).*/\1/p' "$WORK/router.log")/metrics"
}

# Per workload: RATES (a sweep from compare-serving's), N requests a run, the SLOs. Qwen2.5-Coder-0.5B
# computes ~4x SmolLM2-135M's work a token: its rates are lower and its SLOs looser.
params() {
    if [[ "$MODEL" == *qwen* ]]; then
        case "$1" in
            chat) RATES="0.5 1 2"; N=24; SLO_TTFT=3000; SLO_TPOT=200 ;;
            summarize) RATES="0.1 0.2 0.3"; N=12; SLO_TTFT=15000; SLO_TPOT=100 ;;
            shared-prefix) RATES="0.5 1 2"; N=24; SLO_TTFT=3000; SLO_TPOT=200 ;;
            phased) RATES="0.1 0.2 0.3"; N=24; SLO_TTFT=15000; SLO_TPOT=200 ;;
            *) echo "compare-elastic: unknown workload $1" >&2; exit 2 ;;
        esac
    else
        case "$1" in
            chat) RATES="2 4 6"; N=48; SLO_TTFT=1000; SLO_TPOT=100 ;;
            summarize) RATES="0.25 0.5 0.75"; N=24; SLO_TTFT=5000; SLO_TPOT=30 ;;
            shared-prefix) RATES="2 4 6"; N=48; SLO_TTFT=1000; SLO_TPOT=100 ;;
            # 48: 24 a phase, long enough at these rates for the planner to flip past its dwell.
            phased) RATES="0.5 0.75 1"; N=48; SLO_TTFT=5000; SLO_TPOT=100 ;;
            *) echo "compare-elastic: unknown workload $1" >&2; exit 2 ;;
        esac
    fi
    TIMEOUT=300
    if [ -n "$RATES_OVERRIDE" ]; then RATES="$RATES_OVERRIDE"; fi
    if [ -n "$N_OVERRIDE" ]; then N="$N_OVERRIDE"; fi
    if [ "$QUICK" = 1 ]; then RATES="${RATES%% *}"; N=4; TIMEOUT=60; fi
}

# One run: DEPLOYMENT WORKLOAD RATE K (the rate's place in the sweep, which seeds its trace).
run() {
    local dep="$1" w="$2" rate="$3" k="$4" line
    echo "== $dep / $w: rate $rate, $N requests, SLO TTFT ${SLO_TTFT} ms, TPOT ${SLO_TPOT} ms" >&2
    start "$dep"
    line=$(timeout $((TIMEOUT + 60)) "$T" bench serve --target "$TARGET" --api grpc --workload "$w" \
        --rate "$rate" --requests "$N" --slo-ttft-ms "$SLO_TTFT" --slo-tpot-ms "$SLO_TPOT" \
        --seed $((7 + k)) --timeout "$TIMEOUT" --json) || echo "compare-elastic: $dep / $w at rate $rate failed" >&2
    curl -sf --max-time 10 "$METRICS" >"$WORK/metrics.txt" || : >"$WORK/metrics.txt"
    stop_all
    for f in "$WORK"/*.log; do cp "$f" "$OUT/logs/$dep-$w-$rate-$(basename "$f")"; done
    [ -n "$line" ] || return 0
    python3 - "$dep" "$WORK/metrics.txt" "$line" >>"$OUT/$dep-$w.jsonl" <<'EOF'
import json, sys
dep, metrics, line = sys.argv[1], sys.argv[2], sys.argv[3]
v = json.loads(line)
v["deployment"] = dep
series = {}
for l in open(metrics):
    if l.startswith(("tandem_planner_decisions_total", "tandem_router_prefill_placement_total")):
        name, value = l.rsplit(None, 1)
        series[name] = float(value)
v["router_metrics"] = series
print(json.dumps(v))
EOF
}

for w in $WORKLOADS; do
    params "$w"
    for d in $DEPLOYMENTS; do
        rm -f "$OUT/$d-$w.jsonl"
        k=0
        for r in $RATES; do
            run "$d" "$w" "$r" "$k"
            k=$((k + 1))
        done
    done
done

# Summary: per workload and deployment, the highest rate with >= 90% attainment and the figures
# there (the lowest rate's, marked "none", when no rate reached it), then the issue's ratios.
python3 - "$OUT" "$WORKLOADS" "$DEPLOYMENTS" <<'EOF'
import json, pathlib, sys
out, workloads, deployments = pathlib.Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()

def best(dep, w):
    f = out / f"{dep}-{w}.jsonl"
    runs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []
    if not runs:
        return None
    ok = [r for r in runs if r["slo_attainment"] >= 0.9]
    r = max(ok, key=lambda r: r["rate"]) if ok else min(runs, key=lambda r: r["rate"])
    return r, bool(ok)

def ratio(name, num, den, key):
    if not (num and den):
        print(f"  {name}: n/a (a deployment has no run)")
        return
    (a, a_ok), (b, b_ok) = num, den
    note = "" if a_ok and b_ok else " (a deployment met the SLOs at no rate: figures at its lowest rate)"
    value = a[key] / b[key] if b[key] else float("inf")
    print(f"  {name}: {value:.2f}{note}")

for w in workloads:
    print(f"\n{w}")
    print(f"  {'deployment':10} {'best rate':>9} {'goodput':>8} {'rejected':>8} {'out tok/s':>9} {'TTFT p90':>9} {'TPOT p90':>9}")
    found = {}
    for d in deployments:
        b = best(d, w)
        found[d] = b
        if not b:
            continue
        r, ok = b
        rate = f"{r['rate']:g}" if ok else "none"
        print(f"  {d:10} {rate:>9} {r['goodput_rps']:8.2f} {100 * r['rejection_rate']:7.1f}% {r['output_tok_s']:9.1f} "
              f"{r['ttft_ms']['p90']:9.0f} {r['tpot_ms']['p90']:9.1f}")
        for p in r.get("phases", []):
            print(f"    phase {p['phase']}: {p['requests']} requests, attainment {100 * p['slo_attainment']:.1f}%, "
                  f"goodput {p['goodput_rps']:.2f}, {p['output_tok_s']:.1f} out tok/s, "
                  f"TTFT p50/p90 {p['ttft_ms']['p50']:.0f}/{p['ttft_ms']['p90']:.0f} ms, "
                  f"TPOT p50/p90 {p['tpot_ms']['p50']:.1f}/{p['tpot_ms']['p90']:.1f} ms")
        if r.get("router_metrics"):
            for k, v in sorted(r["router_metrics"].items()):
                print(f"    {k} {v:g}")
    get = found.get
    if w == "chat":
        ratio("perreq / agg output tok/s", get("perreq"), get("agg"), "output_tok_s")
    elif w == "summarize":
        ratio("perreq / agg goodput", get("perreq"), get("agg"), "goodput_rps")
    elif w == "phased":
        fixed = [(d, found[d]) for d in ("agg", "static", "perreq") if found.get(d)]
        if fixed:
            d, b = max(fixed, key=lambda x: x[1][0]["goodput_rps"])
            ratio(f"planner / best fixed split ({d}) goodput", get("planner"), b, "goodput_rps")
EOF
