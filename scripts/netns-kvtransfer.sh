#!/usr/bin/env bash
# Runs the KV transfer overlap bench across two network namespaces joined by a
# veth pair shaped with netem (10 Gbit/s, 0.2 ms delay each way), so the layer-wise
# transfer crosses a real (emulated) link instead of plain loopback.
#
#   scripts/netns-kvtransfer.sh [--tokens 1024,4096] [--threads N] [--json]
#
#   rx namespace: 10.77.0.1  `tandem bench kvtransfer --serve 10.77.0.1:PORT`
#   tx namespace: 10.77.0.2  `tandem bench kvtransfer --overlap --connect 10.77.0.1:PORT`
#
# The bench runs once per size, each against a fresh receiver; the merged table (or
# JSON) goes to stdout; the receivers' logs, a ping across the link and the qdisc
# counters (`tc -s qdisc`) go to stderr. Namespaces are named
# tandem-{rx,tx}-<pid> and are always removed on exit, as is the receiver.
# Needs root and iproute2; when namespaces cannot
# be created it prints "skipped: <reason>" and exits 0.
#
# When the kernel has no sch_netem, both ends are shaped with tbf at 10 Gbit/s
# instead (rate only, no added delay) and a warning says so.
#
# Env: TANDEM_BIN      the tandem binary (default: target/release/tandem in this repo)
#      TANDEM_MODEL    the model (the binary's own default otherwise)
#      KV_PORT         the receiver's port (default 47700)
#      NETEM_REQUIRED  1: fail instead of falling back to tbf when netem is missing
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

TOKENS="1024,4096"
THREADS=""
JSON=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tokens) TOKENS="${2:?--tokens needs a value}"; shift 2 ;;
        --tokens=*) TOKENS="${1#*=}"; shift ;;
        --threads) THREADS="${2:?--threads needs a value}"; shift 2 ;;
        --threads=*) THREADS="${1#*=}"; shift ;;
        --json) JSON="--json"; shift ;;
        -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

BIN="${TANDEM_BIN:-$ROOT/target/release/tandem}"
if [[ "$BIN" != /* ]]; then
    BIN="$PWD/$BIN"
fi
if [[ ! -x "$BIN" ]]; then
    echo "error: no tandem binary at $BIN (cargo build --release -p tandem, or set TANDEM_BIN)" >&2
    exit 1
fi
# The default model path is relative to the repo root.
cd "$ROOT"

if ! command -v ip >/dev/null 2>&1; then
    echo "skipped: 'ip' (iproute2) is not installed"
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]]; then
    echo "skipped: network namespaces need root (running as uid $(id -u))"
    exit 0
fi

NS_RX="tandem-rx-$$"
NS_TX="tandem-tx-$$"
IF_RX="veth-rx"
IF_TX="veth-tx"
IP_RX="10.77.0.1"
IP_TX="10.77.0.2"
PORT="${KV_PORT:-47700}"
WAIT_SECS=30

LOG="$(mktemp)"
OUT="$(mktemp)"
RX_PID=""
TX_PID=""
CREATED=()

# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    local rc=$?
    set +e
    if [[ -n "$TX_PID" ]]; then
        kill "$TX_PID" 2>/dev/null
        wait "$TX_PID" 2>/dev/null
    fi
    if [[ -n "$RX_PID" ]] && kill -0 "$RX_PID" 2>/dev/null; then
        kill "$RX_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$RX_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$RX_PID" 2>/dev/null
        wait "$RX_PID" 2>/dev/null
    fi
    for ns in "${CREATED[@]}"; do
        # Anything still running in a namespace this script made was started by it.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    rm -f "$LOG" "$OUT"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! err="$(ip netns add "$NS_RX" 2>&1)"; then
    echo "skipped: cannot create a network namespace (ip netns add: ${err//$'\n'/ })"
    exit 0
fi
CREATED+=("$NS_RX")
ip netns add "$NS_TX"
CREATED+=("$NS_TX")

# The veth pair is created with each end already inside its namespace.
ip link add "$IF_RX" netns "$NS_RX" type veth peer name "$IF_TX" netns "$NS_TX"
ip -n "$NS_RX" addr add "$IP_RX/24" dev "$IF_RX"
ip -n "$NS_TX" addr add "$IP_TX/24" dev "$IF_TX"
SHAPING="netem rate 10gbit delay 0.2ms"
for pair in "$NS_RX:$IF_RX" "$NS_TX:$IF_TX"; do
    ns="${pair%%:*}" dev="${pair#*:}"
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$dev" up
    if [[ "$SHAPING" == netem* ]] && ! err="$(ip netns exec "$ns" tc qdisc add dev "$dev" root netem rate 10gbit delay 0.2ms 2>&1)"; then
        # Some kernels (e.g. minimal VM kernels) are built without sch_netem.
        if [[ "${NETEM_REQUIRED:-0}" == 1 ]]; then
            echo "error: tc netem on $dev failed (is sch_netem available?): $err" >&2
            exit 1
        fi
        SHAPING="tbf rate 10gbit burst 256kb latency 1ms"
        echo "warning: netem is unavailable (${err//$'\n'/ }); shaping with '$SHAPING' instead: rate only, NO added delay (NETEM_REQUIRED=1 makes this an error)" >&2
    fi
    if [[ "$SHAPING" != netem* ]]; then
        # shellcheck disable=SC2086  # SHAPING is a word list
        ip netns exec "$ns" tc qdisc add dev "$dev" root $SHAPING
    fi
done

# `--serve` reserves blocks for its largest size for every request, and the receiver
# rejects a request that finishes with fewer blocks than reserved, so one receiver
# can serve only one size: run one receiver + sender pair per size (requests 1, 2
# each) and merge the output.
start_receiver() { # tokens port
    : >"$LOG"
    ip netns exec "$NS_RX" "$BIN" bench kvtransfer --serve "$IP_RX:$2" --tokens "$1" >"$LOG" 2>&1 &
    RX_PID=$!
    # Wait until its port answers from the sending namespace (across the veth link).
    local deadline=$((SECONDS + WAIT_SECS))
    until ip netns exec "$NS_TX" timeout 1 bash -c "exec 3<>/dev/tcp/$IP_RX/$2" 2>/dev/null; do
        if ! kill -0 "$RX_PID" 2>/dev/null; then
            echo "error: the receiver exited early; its log:" >&2
            cat "$LOG" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "error: receiver on $IP_RX:$2 did not answer within ${WAIT_SECS}s; its log:" >&2
            cat "$LOG" >&2
            exit 1
        fi
        sleep 0.2
    done
}

stop_receiver() {
    kill "$RX_PID" 2>/dev/null || true
    wait "$RX_PID" 2>/dev/null || true
    RX_PID=""
    echo "receiver log:" >&2
    sed 's/^/  /' "$LOG" >&2
}

echo "netns: $NS_TX ($IP_TX) -> $NS_RX ($IP_RX), veth + '$SHAPING' on both ends" >&2
IFS=',' read -r -a SIZES <<<"$TOKENS"
status=0
rows=()
port=$PORT
for t in "${SIZES[@]}"; do
    start_receiver "$t" "$port"
    if [[ "$port" == "$PORT" ]] && command -v ping >/dev/null 2>&1; then
        echo "link: ping $IP_TX -> $IP_RX: $(ip netns exec "$NS_TX" ping -c 5 -i 0.2 -q "$IP_RX" 2>&1 | tail -n 1)" >&2
    fi
    args=(bench kvtransfer --overlap --connect "$IP_RX:$port" --tokens "$t")
    if [[ -n "$THREADS" ]]; then
        args+=(--threads "$THREADS")
    fi
    if [[ -n "$JSON" ]]; then
        args+=("$JSON")
    fi
    # In the background so that a signal to this script is handled at once (`wait`).
    ip netns exec "$NS_TX" "$BIN" "${args[@]}" >"$OUT" &
    TX_PID=$!
    wait "$TX_PID" || status=1
    TX_PID=""
    out="$(cat "$OUT")"
    if [[ -n "$JSON" ]]; then
        # {"overlap":[{row}]} -> {row}
        out="${out#*\"overlap\":[}"
        [[ -n "$out" && "$out" != "]}" ]] && rows+=("${out%]\}}")
    else
        if [[ "$port" == "$PORT" ]]; then
            printf '%s\n' "$out"
        else
            printf '%s\n' "$out" | grep -v -e '^| tokens' -e '^| ---' || true
        fi
    fi
    stop_receiver
    ((status == 0)) || break
    port=$((port + 1))
done
if [[ -n "$JSON" ]]; then
    (IFS=','; echo "{\"overlap\":[${rows[*]}]}")
fi

for pair in "$NS_TX:$IF_TX" "$NS_RX:$IF_RX"; do
    ns="${pair%%:*}" dev="${pair#*:}"
    echo "qdisc: $dev: $(ip netns exec "$ns" tc -s qdisc show dev "$dev" | tr -s ' \n' ' ')" >&2
done
exit "$status"
