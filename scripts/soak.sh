#!/usr/bin/env bash
# The soak (issue 9, test 12): a real cluster on loopback (a throwaway etcd, 2 prefill and
# 2 decode workers and a router, each its own process) under open-loop load at a fraction
# of its measured capacity, while a random worker is SIGKILLed and restarted every minute.
# Reports the success rate, the KV blocks workers still hold once the load has settled,
# the router's and workers' RSS at the start, every minute and at the end, and the
# shared-memory segments of killed workers that live ones still map; checks them against
# issue 9's targets (>= 99.9% success, 0 leaked blocks, RSS growth < 5%) and 0 such
# segments (exit status 1 if one is missed).
#
#   scripts/soak.sh [--minutes M] [--load-fraction F] [--kill-every S] [--scrape-every S] [--keep]
#
# --minutes: minutes of load (default 10, at most 120); --load-fraction: the open-loop
# rate as a fraction of the capacity measured first (default 0.7); --kill-every: seconds
# between kills (default 60); --scrape-every: seconds between reads of every /metrics,
# as Prometheus scrapes them (default 15, as deploy/prometheus; 0: never, which shows
# what metrics cost a process nobody scrapes); --keep: keep the logs (their directory is
# printed).
# Bounded: one kill per period while the load runs, the load ends after its requests or
# its timeout, and every process it starts is stopped when it exits. Needs a release
# build (it builds one) and etcd (scripts/setup-etcd.sh). Not part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MINUTES=10
FRACTION=0.7
KILL_EVERY=60
SCRAPE_EVERY=15
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) MINUTES="$2"; shift 2 ;;
        --load-fraction) FRACTION="$2"; shift 2 ;;
        --kill-every) KILL_EVERY="$2"; shift 2 ;;
        --scrape-every) SCRAPE_EVERY="$2"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        *) echo "usage: $0 [--minutes M] [--load-fraction F] [--kill-every S] [--scrape-every S] [--keep]" >&2
           exit 2 ;;
    esac
done
python3 -c "import sys; m, f, k, s = int('$MINUTES'), float('$FRACTION'), int('$KILL_EVERY'), int('$SCRAPE_EVERY'); \
sys.exit(not (1 <= m <= 120 and 0 < f <= 1 and k >= 10 and s >= 0))" 2>/dev/null ||
    { echo "soak: --minutes 1..120, --load-fraction in (0, 1], --kill-every >= 10, --scrape-every >= 0" >&2; exit 2; }

MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
scripts/fetch-model.sh >/dev/null
command -v etcd >/dev/null || { echo "soak: etcd is needed: scripts/setup-etcd.sh" >&2; exit 1; }
cargo build --release --locked -p tandem >/dev/null 2>&1 || cargo build --release --locked -p tandem
T=target/release/tandem
# Only this script's settings reach the processes (RUST_LOG would hide the router's
# `worker joined` lines this script waits for).
for v in $(compgen -e | grep '^TANDEM_' || true); do unset "$v"; done
unset RUST_LOG
WORK="$(mktemp -d -t tandem-soak.XXXXXX)"
# The workers' shared-memory KV segments (those of killed workers too) in a directory of
# their own, on tmpfs as by default.
if [ -d /dev/shm ]; then SHM="$(mktemp -d /dev/shm/tandem-soak.XXXXXX)"; else SHM="$WORK/shm"; mkdir "$SHM"; fi
export TANDEM_SHM_DIR="$SHM"
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
        alive=0
        for p in "${PIDS[@]:-}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in "${PIDS[@]:-}"; do kill -KILL "$p" 2>/dev/null || true; done
    rm -rf "$SHM"
    if [ "$KEEP" = 1 ]; then echo "soak: logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

log() { echo "soak: $*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits until FILE has a line matching PATTERN (60 s at most).
wait_for() {
    for _ in $(seq 1 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "soak: timed out waiting for '$2' in $1" >&2
    tail -20 "$1" >&2
    return 1
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# The sum of the samples of metric $2 (labels ignored) in the /metrics of $1 (host:port);
# -1 when it cannot be read.
metric() {
    local body
    body=$(curl -sf --max-time 5 "http://$1/metrics") || { echo -1; return 0; }
    awk -v m="$2" '$1 == m || index($1, m "{") == 1 {s += $NF} END {printf "%.0f\n", s}' <<<"$body"
}

CP=$(free_port)
PP=$(free_port)
ETCD="http://127.0.0.1:$CP"
etcd --name soak --data-dir "$WORK/etcd" --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
    --listen-peer-urls "http://127.0.0.1:$PP" --initial-advertise-peer-urls "http://127.0.0.1:$PP" \
    --initial-cluster "soak=http://127.0.0.1:$PP" >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
wait_for "$WORK/etcd.log" "ready to serve client requests"
COMMON=(--model "$MODEL" --etcd "$ETCD" --cluster soak --lease-ttl 2)

WORKERS=(prefill-0 prefill-1 decode-0 decode-1)
declare -A PID METRICS RSS0 RESTARTS
# Starts worker $1 (its role is its id's prefix) and waits until it serves.
start_worker() {
    local id=$1 n
    n=$(( ${RESTARTS[$id]:-0} ))
    "$T" "${id%-*}" "${COMMON[@]}" --id "$id" --threads 1 --metrics-listen 127.0.0.1:0 \
        >"$WORK/$id.$n.log" 2>&1 &
    PID[$id]=$!
    PIDS+=($!)
    wait_for "$WORK/$id.$n.log" "tandem: ready"
    METRICS[$id]=$(sed -n 's#^tandem: metrics http://\([^/]*\)/metrics#\1#p' "$WORK/$id.$n.log")
}
for w in "${WORKERS[@]}"; do start_worker "$w"; done
"$T" router "${COMMON[@]}" --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$WORK/router.log" 2>&1 &
ROUTER=$!
PIDS+=($!)
wait_for "$WORK/router.log" "tandem: ready"
for w in "${WORKERS[@]}"; do wait_for "$WORK/router.log" "worker joined worker=$w role="; done
GRPC=$(sed -n 's/^tandem: router grpc \([^ ]*\) http.*/\1/p' "$WORK/router.log")
HTTP=$(sed -n 's/^tandem: router grpc [^ ]* http \([^ ]*\) .*/\1/p' "$WORK/router.log")
log "cluster up: router grpc $GRPC http $HTTP; workers ${WORKERS[*]}; etcd $ETCD"

# Warm-up, so the RSS taken next is a warm process's: long prompts cycle every KV block
# of every pool (a pool's pages become resident on first use), then a burst of 96
# concurrent requests, more than the load's peaks while a worker restarts, sets the
# allocators' high-water marks.
"$T" bench serve --target "$GRPC" --workload summarize --max-tokens 8 --concurrency 16 --requests 48 --seed 3 \
    --json >"$WORK/warmup.json"
"$T" bench serve --target "$GRPC" --workload chat --max-tokens 32 --concurrency 96 --requests 192 --seed 5 \
    --json >>"$WORK/warmup.json"
# Capacity: a closed loop that keeps every worker busy; its request rate.
BENCH=(bench serve --target "$GRPC" --workload chat --max-tokens 32 --json)
"$T" "${BENCH[@]}" --concurrency 16 --requests 96 --seed 7 --timeout 600 >"$WORK/capacity.json"
CAPACITY=$(python3 -c "import json; print(round(json.load(open('$WORK/capacity.json'))['throughput_rps'], 2))")
RATE=$(python3 -c "print(round($FRACTION * $CAPACITY, 3))")
REQUESTS=$(python3 -c "import math; print(math.ceil($RATE * $MINUTES * 60))")
log "capacity $CAPACITY req/s (chat, 32 output tokens, 16 concurrent); load $RATE req/s, $REQUESTS requests over" \
    "$MINUTES min; a kill every $KILL_EVERY s; /metrics read every $SCRAPE_EVERY s (0: never)"

RSS_ROUTER0=$(rss_kib "$ROUTER")
curl -sf --max-time 5 "http://$HTTP/metrics" >"$WORK/router-metrics.start" || true
for w in "${WORKERS[@]}"; do RSS0[$w]=$(rss_kib "${PID[$w]}"); done

"$T" "${BENCH[@]}" --rate "$RATE" --requests "$REQUESTS" --seed 11 --timeout $((MINUTES * 60 + 240)) \
    >"$WORK/load.json" 2>"$WORK/load.err" &
LOAD=$!
PIDS+=($!)
START=$(date +%s)
KILLS=0
CRASHES=0
SCRAPED=0
SAMPLED=0
# A random worker is killed every KILL_EVERY s while the load's arrivals last.
while kill -0 "$LOAD" 2>/dev/null; do
    sleep 1
    now=$(( $(date +%s) - START ))
    if [ "$SCRAPE_EVERY" -gt 0 ] && [ $((now - SCRAPED)) -ge "$SCRAPE_EVERY" ]; then
        for m in "$HTTP" "${METRICS[@]}"; do curl -sf --max-time 5 "http://$m/metrics" >/dev/null || true; done
        SCRAPED=$now
    fi
    for w in "${WORKERS[@]}"; do
        if ! kill -0 "${PID[$w]}" 2>/dev/null; then
            log "worker $w exited on its own at ${now} s; restarting it"
            CRASHES=$((CRASHES + 1))
            RESTARTS[$w]=$(( ${RESTARTS[$w]:-0} + 1 ))
            start_worker "$w"
        fi
    done
    if [ "$now" -ge $((SAMPLED + 60)) ]; then
        SAMPLED=$now
        line="RSS at ${now} s (KiB): router $(rss_kib "$ROUTER")"
        for w in "${WORKERS[@]}"; do line="$line, $w $(rss_kib "${PID[$w]}")"; done
        log "$line"
    fi
    if [ "$now" -ge $(( (KILLS + 1) * KILL_EVERY )) ] && [ "$now" -lt $((MINUTES * 60)) ]; then
        w=${WORKERS[$((RANDOM % ${#WORKERS[@]}))]}
        old=${PID[$w]}
        kill -KILL "$old"
        wait "$old" 2>/dev/null || true
        KILLS=$((KILLS + 1))
        RESTARTS[$w]=$(( ${RESTARTS[$w]:-0} + 1 ))
        t0=$(date +%s.%N)
        start_worker "$w"
        log "kill $KILLS at ${now} s: $w (pid $old) SIGKILLed; restarted as pid ${PID[$w]}, serving after $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
    fi
done
wait "$LOAD" || true
log "load done after $(( $(date +%s) - START )) s"

# Settle: nothing running, waiting or held on any worker (60 s at most).
LEAKED=-1
for _ in $(seq 1 120); do
    LEAKED=0
    for w in "${WORKERS[@]}"; do
        for m in tandem_kv_blocks_used tandem_worker_requests_running tandem_worker_requests_waiting \
            tandem_worker_requests_waiting_for_kv; do
            LEAKED=$((LEAKED + $(metric "${METRICS[$w]}" "$m")))
        done
    done
    [ "$LEAKED" = 0 ] && break
    sleep 0.5
done
BLOCKS=0
for w in "${WORKERS[@]}"; do BLOCKS=$((BLOCKS + $(metric "${METRICS[$w]}" tandem_kv_blocks_used))); done
INFLIGHT=$(metric "$HTTP" tandem_router_requests_in_flight)
curl -sf --max-time 5 "http://$HTTP/metrics" >"$WORK/router-metrics.end" || true
# The router's counts over the load alone (the warm-up's are left out): errors by kind, migrations.
COUNTS=$(python3 - "$WORK/router-metrics.start" "$WORK/router-metrics.end" <<'EOF'
import re, sys
def read(path):
    out = {}
    for line in open(path):
        m = re.match(r'(tandem_requests_total|tandem_migrations_total)(\{[^}]*\})? (\S+)$', line)
        if m and ('outcome="error"' in (m.group(2) or "") or m.group(1) == "tandem_migrations_total"):
            kind = re.search(r'kind="([^"]*)"', m.group(2) or "")
            key = kind.group(1) if kind else "migrations"
            out[key] = out.get(key, 0) + float(m.group(3))
    return out
start, end = read(sys.argv[1]), read(sys.argv[2])
migrations = end.pop("migrations", 0) - start.pop("migrations", 0)
errors = {k: v - start.get(k, 0) for k, v in end.items() if v - start.get(k, 0) > 0}
print(f"migrations {migrations:.0f}, router errors by kind: "
      + (", ".join(f"{k} {v:.0f}" for k, v in sorted(errors.items())) or "none"))
EOF
)
ROUTER_ALIVE=yes
kill -0 "$ROUTER" 2>/dev/null || ROUTER_ALIVE=no

RSS_ROUTER1=$(rss_kib "$ROUTER")
growth() { python3 -c "print(f'{100 * ($2 / $1 - 1):+.1f}%')"; }
python3 - "$WORK/load.json" <<EOF
import json, sys
v = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
n, failed = v["requests"], v["failed"]
print(f"soak: {n} requests, {failed} failed: success {100 * (n - failed) / n:.3f}%; first error: {v['first_error']}")
print(f"soak: throughput {v['throughput_rps']:.2f} req/s; TTFT p50 {v['ttft_ms']['p50']:.0f} ms, p99 {v['ttft_ms']['p99']:.0f} ms; "
      f"e2e p99 {v['e2e_ms']['p99']:.0f} ms")
open("$WORK/success", "w").write(str((n - failed) / n))
EOF
log "kills $KILLS, workers that exited on their own $CRASHES, $COUNTS"
log "after settling: $BLOCKS KV blocks held, router in flight $INFLIGHT, router alive $ROUTER_ALIVE"
log "router RSS $RSS_ROUTER0 KiB at the start, $RSS_ROUTER1 KiB at the end ($(growth "$RSS_ROUTER0" "$RSS_ROUTER1"))"
WORKER_GROWTH_OK=1
for w in "${WORKERS[@]}"; do
    r1=$(rss_kib "${PID[$w]}")
    n=${RESTARTS[$w]:-0}
    if [ "$n" = 0 ]; then
        log "$w RSS ${RSS0[$w]} KiB at the start, $r1 KiB at the end ($(growth "${RSS0[$w]}" "$r1")); never killed"
        python3 -c "import sys; sys.exit(not ($r1 < 1.05 * ${RSS0[$w]}))" || WORKER_GROWTH_OK=0
    else
        log "$w RSS ${RSS0[$w]} KiB at the start, $r1 KiB at the end ($(growth "${RSS0[$w]}" "$r1")); restarted $n time(s)"
    fi
done
# Shared-memory KV segments (`tandem-kv-<pid>-...`) still mapped whose owner is gone: memory
# a worker keeps for a peer that no longer exists.
STALE=0
for w in "${WORKERS[@]}"; do
    n=0
    for seg in $(awk '$6 ~ /\/tandem-kv-[0-9]+-/ {print $6}' "/proc/${PID[$w]}/maps" | sort -u); do
        owner=$(basename "$seg" | cut -d- -f3)
        kill -0 "$owner" 2>/dev/null || n=$((n + 1))
    done
    [ "$n" = 0 ] || log "$w still maps $n shared-memory KV segment(s) of workers that are gone"
    STALE=$((STALE + n))
done

SUCCESS=$(cat "$WORK/success")
FAIL=0
python3 -c "import sys; sys.exit(not ($SUCCESS >= 0.999))" || { log "MISSED: success below 99.9%"; FAIL=1; }
if [ "$BLOCKS" != 0 ] || [ "$LEAKED" != 0 ]; then log "MISSED: workers still hold blocks or requests"; FAIL=1; fi
if [ "$INFLIGHT" != 0 ] || [ "$ROUTER_ALIVE" != yes ]; then log "MISSED: the router holds requests or died"; FAIL=1; fi
[ "$CRASHES" = 0 ] || { log "MISSED: a worker exited on its own"; FAIL=1; }
python3 -c "import sys; sys.exit(not ($RSS_ROUTER1 < 1.05 * $RSS_ROUTER0))" || { log "MISSED: router RSS grew 5% or more"; FAIL=1; }
[ "$WORKER_GROWTH_OK" = 1 ] || { log "MISSED: a worker's RSS grew 5% or more"; FAIL=1; }
[ "$STALE" = 0 ] || { log "MISSED: workers keep $STALE shared-memory segment(s) of killed workers mapped"; FAIL=1; }
[ "$FAIL" = 0 ] && log "every target met"
exit "$FAIL"
