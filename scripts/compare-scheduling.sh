#!/usr/bin/env bash
# Scheduling policies compared on this machine's two cores, one sitting, the same GGUF and the
# same seeded traces (issue 21). Every run starts a fresh 1P1D deployment: a throwaway etcd on
# loopback, a prefill worker pinned to core 0 and a decode worker pinned to core 1 (one thread
# each), a router unpinned, all with the run's --scheduling-policy, and sends one open-loop load
# with `tandem bench serve`. JSON lines go to OUT/EXPERIMENT.jsonl (the bench's figures plus
# `policy` and, for admission, the router's TTFT prediction error series); the summary at the end
# prints the issue's ratios.
#
#   capacity   closed loop, fcfs: chat (64 output tokens, 16 clients) and summarize (4 clients)
#              and mixed-length (decode --max-seqs $SJF_SEQS, 8 clients, the sjf runs' own
#              requests): requests/s served.
#   fairness   tenant a at 4x chat capacity and tenant b at 0.25x, each with its own API key,
#              for $DURATION s: policy fair, then fcfs; then b alone (fair). B's TTFT p99
#              against b alone, and the largest service gap while both were backlogged against
#              VTC's bound (2x the largest request's service, prompt token 1, output token 2).
#   sjf        mixed-length (13 prompt kinds, natural lengths up to 512 tokens, EOS honoured) at
#              $SJF_LOAD of its capacity, decode --max-seqs $SJF_SEQS: fcfs (which also records
#              every request's true length), sjf with the built-in predictor, and sjf given the
#              true lengths (`expected_output_tokens`: an oracle predictor).
#   admission  summarize at 2x its capacity, every request with a TTFT SLO of $ADMIT_SLO ms:
#              router --slo-admission explicit, then off. Goodput (requests within the SLOs per
#              second), rejection rate, and the predicted-TTFT error.
#
#   scripts/compare-scheduling.sh [--out DIR] [--experiments "capacity fairness sjf admission"]
#                                 [--duration S] [--quick]
#
# SJF_RATE=R (environment): the sjf runs' rate, in place of $SJF_LOAD of the capacity.
# --quick: a few requests per run, checks the plumbing, measures nothing. Bounded: every run
# sends a fixed number of requests and has a timeout; every process it starts is stopped when it
# exits. Needs: a release build (it builds one), etcd (scripts/setup-etcd.sh), taskset, curl,
# python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=target/compare-scheduling
EXPERIMENTS="capacity fairness sjf admission"
DURATION=30
QUICK=0
SJF_SEQS=4
SJF_LOAD=0.8
ADMIT_SLO=20000
usage() {
    echo "usage: $0 [--out DIR] [--experiments LIST] [--duration S] [--quick]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --experiments) EXPERIMENTS="${2//,/ }"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) usage ;;
    esac
done

scripts/fetch-model.sh smollm2-135m >/dev/null
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
scripts/setup-etcd.sh >/dev/null
for tool in taskset curl python3; do
    command -v "$tool" >/dev/null || { echo "compare-scheduling: $tool is needed" >&2; exit 1; }
done
cargo build --release --locked -p tandem >/dev/null 2>&1 || cargo build --release --locked -p tandem
T=target/release/tandem

mkdir -p "$OUT/logs"
# shellcheck source=lib/procs.sh
source scripts/lib/procs.sh
procs_init compare-scheduling

KEY_A=tenant-a-key-0123456789
KEY_B=tenant-b-key-0123456789

# start POLICY "DECODE FLAGS" "ROUTER FLAGS": sets TARGET (gRPC) and METRICS.
start() {
    local policy="$1"
    read -r -a decode_flags <<<"$2"
    read -r -a router_flags <<<"$3"
    rm -rf "$WORK"/*.log "$WORK"/etcd-*
    start_etcd
    local common=(--model "$MODEL" --etcd "$ETCD" --cluster compare-scheduling)
    taskset -c 0 "$T" prefill "${common[@]}" --id prefill-0 --threads 1 --scheduling-policy "$policy" \
        >"$WORK/prefill-0.log" 2>&1 &
    PIDS+=($!)
    taskset -c 1 "$T" decode "${common[@]}" --id decode-0 --threads 1 --scheduling-policy "$policy" \
        "${decode_flags[@]}" >"$WORK/decode-0.log" 2>&1 &
    PIDS+=($!)
    for id in prefill-0 decode-0; do wait_for "$WORK/$id.log" "tandem: ready"; done
    "$T" router "${common[@]}" --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
        --scheduling-policy "$policy" --api-key "a:$KEY_A" --api-key "b:$KEY_B" "${router_flags[@]}" \
        >"$WORK/router.log" 2>&1 &
    PIDS+=($!)
    for id in prefill-0 decode-0; do wait_for "$WORK/router.log" "worker joined worker=$id role="; done
    TARGET=$(sed -n 's/^tandem: router grpc \([^ ]*\).*/\1/p' "$WORK/router.log")
    METRICS="http://$(sed -n 's/^tandem: router grpc [^ ]* http \([^ ]*\).*/\1/p' "$WORK/router.log")/metrics"
}

# run EXPERIMENT LABEL POLICY "DECODE FLAGS" "ROUTER FLAGS" BENCH-FLAGS...: one JSON line.
run() {
    local exp="$1" label="$2" policy="$3" dflags="$4" rflags="$5" line
    shift 5
    echo "== $exp / $label ($policy): $*" >&2
    start "$policy" "$dflags" "$rflags"
    line=$(timeout 900 "$T" bench serve --target "$TARGET" --api grpc --api-key "$KEY_A" --timeout 600 \
        --json "$@") || echo "compare-scheduling: $exp / $label failed" >&2
    curl -sf --max-time 10 -H "authorization: Bearer $KEY_A" "$METRICS" >"$WORK/metrics.txt" || : >"$WORK/metrics.txt"
    stop_all
    for f in "$WORK"/*.log; do cp "$f" "$OUT/logs/$exp-$label-$(basename "$f")"; done
    [ -n "$line" ] || return 0
    python3 - "$label" "$policy" "$WORK/metrics.txt" "$line" >>"$OUT/$exp.jsonl" <<'EOF'
import json, sys
label, policy, metrics, line = sys.argv[1:5]
v = json.loads(line.splitlines()[-1])
v["label"], v["policy"] = label, policy
series = {}
for l in open(metrics):
    if l.startswith(("tandem_ttft_prediction_error_seconds", "tandem_router_admission_refusals_total",
                     "tandem_router_predicted_output_tokens_total")):
        name, value = l.rsplit(None, 1)
        series[name] = float(value)
v["router_metrics"] = series
print(json.dumps(v))
EOF
}

# The last run's figure KEY from OUT/EXPERIMENT.jsonl with label LABEL.
figure() {
    python3 -c '
import json, sys
for l in open(sys.argv[1]):
    v = json.loads(l)
    if v["label"] == sys.argv[2]: x = v
print(x[sys.argv[3]])' "$OUT/$1.jsonl" "$2" "$3"
}
scale() { python3 -c "print(round(float('$1') * float('$2'), 3))"; }

N_CAP=64; N_SUM_CAP=8; N_SJF=40; N_ADMIT=24
if [ "$QUICK" = 1 ]; then N_CAP=8; N_SUM_CAP=4; N_SJF=8; N_ADMIT=6; DURATION=3; fi
SEQS="--max-seqs $SJF_SEQS"

for e in $EXPERIMENTS; do
    case "$e" in
        capacity)
            rm -f "$OUT/capacity.jsonl"
            run capacity chat fcfs "" "" --workload chat --max-tokens 64 --concurrency 16 --requests "$N_CAP" --seed 1
            run capacity summarize fcfs "" "" --workload summarize --max-tokens 32 --concurrency 4 \
                --requests "$N_SUM_CAP" --seed 1
            # The sjf runs' own requests (seed 5), so the load is a share of what they cost.
            run capacity mixed-length fcfs "$SEQS" "" --workload mixed-length --concurrency 8 \
                --requests "$N_SJF" --seed 5
            ;;
        fairness)
            rm -f "$OUT/fairness.jsonl"
            c=$(figure capacity chat throughput_rps)
            ra=$(scale "$c" 4)
            rb=$(scale "$c" 0.25)
            for p in fair fcfs; do
                run fairness "$p" "$p" "" "" --workload chat --max-tokens 64 --duration "$DURATION" --seed 3 \
                    --tenant "a=$KEY_A@$ra" --tenant "b=$KEY_B@$rb"
            done
            run fairness b-alone fair "" "" --workload chat --max-tokens 64 --duration "$DURATION" --seed 3 \
                --tenant "b=$KEY_B@$rb"
            ;;
        sjf)
            rm -f "$OUT/sjf.jsonl"
            c=$(figure capacity mixed-length throughput_rps)
            r=${SJF_RATE:-$(scale "$c" "$SJF_LOAD")}
            common=(--workload mixed-length --rate "$r" --requests "$N_SJF" --seed 5)
            run sjf fcfs fcfs "$SEQS" "" "${common[@]}" --lengths-out "$OUT/sjf-lengths.txt"
            run sjf sjf sjf "$SEQS" "" "${common[@]}"
            run sjf oracle sjf "$SEQS" "" "${common[@]}" --expected-lengths "$OUT/sjf-lengths.txt"
            ;;
        admission)
            rm -f "$OUT/admission.jsonl"
            c=$(figure capacity summarize throughput_rps)
            r=$(scale "$c" 2)
            common=(--workload summarize --max-tokens 32 --rate "$r" --requests "$N_ADMIT" --seed 9
                --request-slo-ttft-ms "$ADMIT_SLO" --slo-ttft-ms "$ADMIT_SLO" --slo-tpot-ms 200)
            run admission explicit fcfs "" "--slo-admission explicit" "${common[@]}"
            run admission off fcfs "" "--slo-admission off" "${common[@]}"
            ;;
        *) echo "compare-scheduling: unknown experiment $e" >&2; usage ;;
    esac
done

python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])

def runs(exp):
    p = out / f"{exp}.jsonl"
    return {json.loads(l)["label"]: json.loads(l) for l in open(p)} if p.exists() else {}

def ratio(a, b):
    return f"{a / b:.2f}x" if b else "n/a"

cap = runs("capacity")
for k, v in cap.items():
    print(f"capacity {k}: {v['throughput_rps']:.2f} req/s, {v['output_tok_s']:.0f} output tok/s")
fair = runs("fairness")
if fair:
    alone = fair.get("b-alone", {}).get("tenants", [{}])[0].get("ttft_ms", {}).get("p99", 0)
    for p in ("fair", "fcfs"):
        if p not in fair:
            continue
        v = fair[p]
        t = {x["tenant"]: x for x in v.get("tenants", [])}
        b, a = t.get("b", {}), t.get("a", {})
        f = v.get("fairness", {})
        print(f"fairness {p}: b TTFT p50/p99 {b['ttft_ms']['p50']:.0f}/{b['ttft_ms']['p99']:.0f} ms "
              f"({ratio(b['ttft_ms']['p99'], alone)} b alone's p99 {alone:.0f}); served a {a['requests'] - a['failed']}"
              f"/{a['requests']} b {b['requests'] - b['failed']}/{b['requests']}; service a {a['service']:.0f} "
              f"b {b['service']:.0f}; gap while both backlogged {f.get('service_gap_max', 0):.0f} "
              f"(bound {f.get('bound_2u', 0):.0f}) over {f.get('both_backlogged_s', 0):.1f} s")
sjf = runs("sjf")
if sjf:
    for k, v in sjf.items():
        d = v["e2e_ms_longest_decile"]
        print(f"sjf {k}: e2e mean {v['e2e_ms']['mean']:.0f} ms p99 {v['e2e_ms']['p99']:.0f}; longest decile "
              f"p99 {d['p99'] if d else 0:.0f}; {v['throughput_rps']:.2f} req/s, {v['output_tok_s']:.0f} tok/s; "
              f"failed {v['failed']}")
    if "fcfs" in sjf:
        f = sjf["fcfs"]
        for k in ("sjf", "oracle"):
            if k in sjf:
                s = sjf[k]
                print(f"  {k} vs fcfs: mean e2e {ratio(f['e2e_ms']['mean'], s['e2e_ms']['mean'])} lower; "
                      f"longest decile p99 {ratio(s['e2e_ms_longest_decile']['p99'], f['e2e_ms_longest_decile']['p99'])} "
                      f"of fcfs'; throughput {ratio(s['throughput_rps'], f['throughput_rps'])}")
adm = runs("admission")
if adm:
    for k, v in adm.items():
        m = v.get("router_metrics", {})
        err = {d: (m.get(f'tandem_ttft_prediction_error_seconds_sum{{direction="{d}"}}', 0),
                   m.get(f'tandem_ttft_prediction_error_seconds_count{{direction="{d}"}}', 0)) for d in ("late", "early")}
        e = "; ".join(f"{d} {s / c * 1e3:.0f} ms mean over {c:.0f}" for d, (s, c) in err.items() if c)
        print(f"admission {k}: goodput {v['goodput_rps']:.3f} req/s, attainment {v['slo_attainment']:.0%}, "
              f"refused {v['refusal_rate']:.0%}, TTFT p50/p99 {v['ttft_ms']['p50']:.0f}/{v['ttft_ms']['p99']:.0f} ms; "
              f"prediction error: {e or 'none'}")
    if "explicit" in adm and "off" in adm:
        print(f"  goodput with admission {ratio(adm['explicit']['goodput_rps'], adm['off']['goodput_rps'])} without")
EOF
