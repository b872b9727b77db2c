#!/usr/bin/env bash
# Routing comparison: the same seeded workloads against each routing policy of `tandem up`
# (`--policy`), on 4 workers with small KV pools, as 4 role-`both` workers and as 2 prefill
# + 2 decode workers. Workloads (`tandem bench serve`, open loop, Poisson or trace arrivals):
#   shared-contexts  8 groups, each a ~1,000-token context shared by 4 users' short queries
#   trace            the Mooncake conversation trace, sampled, its blocks scaled to fit
#   chat             short prompts, nothing shared (the control)
# Each worker's pool (--kv-blocks) is a third of what the workload's distinct prompt tokens
# need, so they fill ~75% of the cluster's 4 pools: a policy that keeps requests next to their
# cached prefixes hits, one that spreads them evicts. Prints pool sizes, load and a table of
# results (prefix hit rate against the ideal, TTFT, TPOT, throughput, goodput, rejections).
#
#   scripts/compare-routing.sh [--out DIR]
#
# Environment (defaults in brackets):
#   POLICIES    routing policies to compare ["round-robin least-loaded cache-aware"]; a policy
#               the router does not know fails to start and is reported as such
#   WORKLOADS   ["shared-contexts trace chat"]
#   TOPOLOGIES  "both" (4 role-both workers), "pd" (2 prefill + 2 decode) ["both pd"]
#   REQUESTS    requests per run [40]
#   TRACE_SECONDS  seconds the replayed trace's requests span [60]
#   TRACE       the Mooncake trace [../shared/data/mooncake/conversation_trace.jsonl]; the
#               trace workload is skipped when it is missing
#   PROFILE     release or debug: the build that runs [release]
#   TIMEOUT     seconds one run may take at most [150]
#   POOL_DIVISOR  each worker's pool is the distinct need over this [3]; e.g. 0.5 gives pools
#               that each hold the whole working set twice (the "pools can hold it" case)
#
# Bounded: every run sends REQUESTS requests and stops after TIMEOUT; with the defaults a
# full run is 18 runs of one to two minutes each. Every process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=target/compare-routing
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        *) echo "usage: $0 [--out DIR]  (see the header for the environment it reads)" >&2; exit 2 ;;
    esac
done
POLICIES="${POLICIES:-round-robin least-loaded cache-aware}"
WORKLOADS="${WORKLOADS:-shared-contexts trace chat}"
TOPOLOGIES="${TOPOLOGIES:-both pd}"
REQUESTS="${REQUESTS:-40}"
TRACE_SECONDS="${TRACE_SECONDS:-60}"
TRACE="${TRACE:-../shared/data/mooncake/conversation_trace.jsonl}"
PROFILE="${PROFILE:-release}"
TIMEOUT="${TIMEOUT:-150}"
POOL_DIVISOR="${POOL_DIVISOR:-3}"
SEED=7
BLOCK=16 # tokens per KV block (tandem up's default)
NGROUPS=8 CONTEXT=1000

MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
scripts/fetch-model.sh >/dev/null
case "$PROFILE" in
    release) cargo build --release --locked -p tandem >/dev/null 2>&1 || cargo build --release --locked -p tandem ;;
    debug) CARGO_INCREMENTAL=0 cargo build --locked -p tandem >/dev/null 2>&1 || CARGO_INCREMENTAL=0 cargo build --locked -p tandem ;;
    *) echo "compare-routing: PROFILE is release or debug" >&2; exit 2 ;;
esac
T="target/$PROFILE/tandem"
mkdir -p "$OUT"
rm -f "$OUT"/*.json
WORK="$(mktemp -d)"
PID=""
stop() {
    [ -n "$PID" ] || return 0
    kill -TERM "$PID" 2>/dev/null || true
    # The drain is bounded by --drain-timeout; past it, the process is ended.
    for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
}
trap 'stop; rm -rf "$WORK"' EXIT

# The bench flags of a workload, one per line of WL_ARGS; SLO_* its objectives.
workload_args() {
    case "$1" in
        shared-contexts)
            # A miss prefills ~1,050 tokens: a few seconds of one worker's core.
            WL_ARGS=(--workload shared-contexts --groups "$NGROUPS" --users 4 --context-tokens "$CONTEXT" --query-tokens 20
                --max-tokens 16 --rate 0.5)
            SLO_TTFT=3000; SLO_TPOT=150 ;;
        trace)
            # 2% of the conversations, 16 tokens a hash block (prompts ~430 tokens on average,
            # 1,800 at most), outputs at 5% of the trace's; the span the requests cover in the
            # trace (~13 minutes for 40) replayed in TRACE_SECONDS.
            WL_ARGS=(--workload "trace:$TRACE" --trace-sample 0.02 --trace-block-tokens 16
                --trace-output-scale 0.05 --trace-max-input 1800 --requests "$REQUESTS" --seed "$SEED")
            local span
            span=$("$T" bench serve "${WL_ARGS[@]}" --dry-run | python3 -c 'import json, sys; print(json.load(sys.stdin)["span_s"])')
            WL_ARGS+=(--trace-time-scale "$(python3 -c "print(round($TRACE_SECONDS / max($span, 1), 4))")")
            SLO_TTFT=3000; SLO_TPOT=150 ;;
        chat)
            WL_ARGS=(--workload chat --max-tokens 32 --rate 2)
            SLO_TTFT=1000; SLO_TPOT=150 ;;
        *) echo "compare-routing: unknown workload $1" >&2; exit 2 ;;
    esac
    [ "$1" = trace ] || WL_ARGS+=(--requests "$REQUESTS" --seed "$SEED")
}

# KV blocks per worker for a workload: its distinct prompt tokens (what one infinite cache
# would hold) over 3, but at least its largest request and a quarter more. Prints the blocks per worker,
# the blocks the distinct tokens need, and a trace's size and ideal hit rate.
kv_blocks() {
    local desc
    case "$1" in
        # Distinct prefixes: the contexts, ~50 tokens of chat template and query on top of each.
        # chat shares nothing, so it gets the same pools as shared-contexts.
        shared-contexts | chat) desc="{\"distinct\": $(( NGROUPS * (CONTEXT + 50) )), \"largest\": $(( CONTEXT + 100 ))}" ;;
        trace)
            desc=$("$T" bench serve "${WL_ARGS[@]}" --dry-run | python3 -c '
import json, sys
v = json.load(sys.stdin)
print(json.dumps({"distinct": round(v["prompt_tokens"] * (1 - v["ideal_hit_rate"])),
                  "largest": v["prompt_tokens_max"] + v["output_tokens_max"], "ideal": v["ideal_hit_rate"],
                  "span": v["span_s"], "requests": v["requests"]}))') ;;
    esac
    echo "$desc" >"$WORK/desc.json"
    python3 - "$BLOCK" "$WORK/desc.json" "$POOL_DIVISOR" <<'EOF'
import json, math, sys
block, d, divisor = int(sys.argv[1]), json.load(open(sys.argv[2])), float(sys.argv[3])
need = math.ceil(d["distinct"] / block)
kv = max(math.ceil(need / divisor), math.ceil(1.25 * d["largest"] / block))
info = f"; {d['requests']} requests over {d['span']:.0f} s, ideal hit rate {100 * d['ideal']:.1f}%" if "ideal" in d else ""
print(kv, need, info)
EOF
}

# Starts `tandem up` with policy $1, topology $2, $3 KV blocks per worker; sets TARGET, or
# returns 1 when it does not come up.
start() {
    local workers=(--prefill-workers 0 --decode-workers 4)
    [ "$2" = pd ] && workers=(--prefill-workers 2 --decode-workers 2)
    "$T" up --model "$MODEL" "${workers[@]}" --policy "$1" --kv-blocks "$3" --grpc-port 0 --http-port 0 \
        --drain-timeout 5 >"$WORK/up.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 600); do
        grep -q '^tandem: ready' "$WORK/up.log" && break
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.1
    done
    if ! grep -q '^tandem: ready' "$WORK/up.log"; then
        echo "compare-routing: policy $1 did not start: $(grep -m1 -i error "$WORK/up.log" || tail -n1 "$WORK/up.log")" >&2
        stop
        return 1
    fi
    TARGET=$(sed -n 's/^tandem: router grpc \([^ ]*\).*/\1/p' "$WORK/up.log")
}

for w in $WORKLOADS; do
    if [ "$w" = trace ] && [ ! -r "$TRACE" ]; then
        echo "compare-routing: no trace at $TRACE: skipping the trace workload" >&2
        continue
    fi
    workload_args "$w"
    read -r KV NEED INFO < <(kv_blocks "$w")
    [ -n "${NEED:-}" ] || { echo "compare-routing: could not size the pools for $w" >&2; exit 1; }
    echo "== $w: ${WL_ARGS[*]}" >&2
    if [ "$w" = chat ]; then
        echo "   no context shared: the pools of shared-contexts, $KV KV blocks of $BLOCK tokens per worker" >&2
    else
        echo "   distinct prompt tokens need $NEED KV blocks of $BLOCK tokens; $KV per worker" \
            "($(( KV * 4 )) in the cluster, $(( 100 * NEED / (KV * 4) ))% of it; $(( 100 * NEED / KV ))% of one pool)$INFO" >&2
    fi
    for topo in $TOPOLOGIES; do
        for p in $POLICIES; do
            f="$OUT/$topo-$w-$p.json"
            if ! start "$p" "$topo" "$KV"; then
                echo "{\"topology\": \"$topo\", \"workload\": \"$w\", \"policy\": \"$p\", \"kv_blocks\": $KV, \"error\": \"did not start\"}" >"$f"
                continue
            fi
            echo "   $topo / $p: running $REQUESTS requests" >&2
            if ! "$T" bench serve --target "$TARGET" "${WL_ARGS[@]}" --slo-ttft-ms "$SLO_TTFT" \
                --slo-tpot-ms "$SLO_TPOT" --timeout "$TIMEOUT" --json >"$WORK/run.json" 2>"$WORK/run.err"; then
                echo "   $topo / $p: the bench failed: $(tail -n1 "$WORK/run.err")" >&2
            fi
            python3 - "$topo" "$w" "$p" "$KV" "$WORK/run.json" >"$f" <<'EOF' || true
import json, sys
topo, w, p, kv, run = sys.argv[1:6]
lines = [l for l in open(run).read().splitlines() if l.strip()]
v = json.loads(lines[-1]) if lines else {"error": "no result"}
v.update(topology=topo, workload=w, policy=p, kv_blocks=int(kv))
print(json.dumps(v))
EOF
            stop
        done
    done
done

python3 - "$OUT" "$TOPOLOGIES" "$WORKLOADS" "$POLICIES" <<'EOF'
import json, pathlib, sys
order = [s.split() for s in sys.argv[2:5]]
rows = [json.loads(f.read_text()) for f in pathlib.Path(sys.argv[1]).glob("*.json")]
rows.sort(key=lambda r: tuple(o.index(r[k]) if r[k] in o else len(o) for o, k in zip(order, ["topology", "workload", "policy"])))
hdr = ["topology", "workload", "policy", "KV/worker", "load", "hit %", "ideal %", "TTFT p50", "p90", "p99",
       "TPOT p50", "out tok/s", "goodput", "rejected %"]
print(" | ".join(hdr))
for r in rows:
    base = [r["topology"], r["workload"], r["policy"], str(r["kv_blocks"])]
    if "error" in r:
        print(" | ".join(base + [r["error"]]))
        continue
    load = f"{r['requests']} @ {r['rate']:g}/s" if r.get("rate") else f"{r['requests']} ({r['run']})"
    ideal = f"{100 * r['ideal_hit_rate']:.1f}" if r.get("ideal_hit_rate") is not None else "-"
    t, d = r["ttft_ms"], r["tpot_ms"]
    print(" | ".join(base + [load, f"{100 * r['prefix_hit_rate']:.1f}", ideal, f"{t['p50']:.0f}", f"{t['p90']:.0f}",
                             f"{t['p99']:.0f}", f"{d['p50']:.1f}", f"{r['output_tok_s']:.1f}",
                             f"{r['goodput_rps']:.2f}", f"{100 * r['rejection_rate']:.1f}"]))
EOF
