# shellcheck shell=bash
# Shared by the comparison scripts: start processes, wait for them, stop them all.
#
#   procs_init TAG      WORK (a fresh temporary directory), PIDS, and a trap that stops
#                       every process in PIDS and removes WORK on exit; TAG prefixes messages
#   free_port           a free TCP port on loopback
#   wait_for FILE PAT   until FILE has a line matching PAT (30 s at most)
#   start_etcd          a throwaway etcd on loopback in WORK; sets ETCD (its client URL)
#   stop_all            every process in PIDS, each given 30 s after SIGTERM, then killed
procs_init() {
    PROCS_TAG="$1"
    WORK="$(mktemp -d)"
    PIDS=()
    trap procs_cleanup EXIT
}

procs_cleanup() {
    for p in "${PIDS[@]:-}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${PIDS[@]:-}"; do kill -KILL "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {
    for _ in $(seq 1 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "$PROCS_TAG: timed out waiting for '$2' in $1" >&2
    cat "$1" >&2
    return 1
}

start_etcd() {
    local cp pp
    cp=$(free_port)
    pp=$(free_port)
    etcd --data-dir "$WORK/etcd-$cp" --listen-client-urls "http://127.0.0.1:$cp" \
        --advertise-client-urls "http://127.0.0.1:$cp" --listen-peer-urls "http://127.0.0.1:$pp" \
        >"$WORK/etcd.log" 2>&1 &
    PIDS+=($!)
    wait_for "$WORK/etcd.log" "ready to serve client requests"
    ETCD="http://127.0.0.1:$cp"
}

stop_all() {
    for p in "${PIDS[@]:-}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do
        for _ in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
}
