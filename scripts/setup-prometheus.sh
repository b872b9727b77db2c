#!/usr/bin/env bash
# Installs Prometheus's server and promtool from Debian's `prometheus` package, for
# tests/e2e/metrics.rs and for checking deploy/prometheus/*.yml by hand:
#   prometheus   a scratch server the test starts on a loopback port with a temp dir
#   promtool     `check metrics`, `check rules`, `check config`, `query instant`
#
# Idempotent: does nothing when both are on PATH. FAILS (exit 1) when it cannot
# install them, like scripts/setup-etcd.sh: the metrics test needs both.
#
# Leaves no daemon running. Debian's package starts its service on install where it
# can: under systemd (`deb-systemd-invoke start`), or through its init script when
# `invoke-rc.d` both reads a runlevel and is allowed to (no /usr/sbin/policy-rc.d
# denying it). In a container without an init system nothing starts: invoke-rc.d finds
# no runlevel (and container images usually ship a policy-rc.d that denies starts as
# well). Elsewhere, a freshly installed package's service is stopped and disabled here:
# the tests run their own server, and a stray one would hold port 9090 with the stock
# configuration. A prometheus that was already installed is left exactly as it was.
# `--no-install-recommends` keeps out prometheus-node-exporter, a second daemon.
set -euo pipefail
# shellcheck source=scripts/lib/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"

have_prometheus() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }

if have_prometheus; then
    echo "setup-prometheus: prometheus and promtool already installed ($(prometheus --version 2>&1 | head -n1))"
    exit 0
fi

fail() {
    echo "setup-prometheus: ERROR: $*" >&2
    echo "setup-prometheus: install it by hand (Debian/Ubuntu: apt-get install --no-install-recommends prometheus)," \
         "or put prometheus and promtool binaries on PATH, then run this script again." >&2
    exit 1
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "not root and sudo not found, cannot install prometheus"
    SUDO=(sudo -n)
fi

# Stops and disables the service the package may just have started (see the header).
stop_packaged_service() {
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        "${SUDO[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
    if [ -x /etc/init.d/prometheus ]; then
        # The init script directly: `invoke-rc.d stop` would ask policy-rc.d, which may refuse.
        if [ -f /run/prometheus/prometheus.pid ]; then
            "${SUDO[@]}" /etc/init.d/prometheus stop >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null 2>&1; then
            "${SUDO[@]}" update-rc.d prometheus disable >/dev/null 2>&1 || true
        fi
    fi
    # What the package runs is /usr/bin/prometheus as user prometheus; wait for it to go.
    local _
    for _ in $(seq 1 50); do
        pgrep -u prometheus -x prometheus >/dev/null 2>&1 || return 0
        sleep 0.1
    done
    fail "the package's prometheus service is still running (pid $(pgrep -u prometheus -x prometheus | tr '\n' ' '));" \
         "stop it (systemctl disable --now prometheus, or /etc/init.d/prometheus stop)"
}

apt_install setup-prometheus prometheus || { stop_packaged_service; fail "could not install prometheus"; }
stop_packaged_service

have_prometheus || fail "the prometheus package is installed, but prometheus or promtool is not on PATH"
echo "setup-prometheus: ok: $(prometheus --version 2>&1 | head -n1)"
