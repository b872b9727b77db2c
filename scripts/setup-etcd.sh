#!/usr/bin/env bash
# Installs the real etcd that the discovery tests (cluster/tests/etcd.rs) and the
# end-to-end tests (tests/e2e) start, from Debian's `etcd-server` package.
#
# Building Tandem needs no system package: the crates that generate gRPC code run the
# protoc binary of the `protoc-bin-vendored` crate. So this is for tests only.
#
# Idempotent: does nothing when etcd is on PATH. Unlike the optional tool set-ups, this
# one FAILS (exit 1) when it cannot install it: without etcd the etcd tests fail.
set -euo pipefail
# shellcheck source=scripts/lib/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"

if command -v etcd >/dev/null 2>&1; then
    echo "setup-etcd: etcd already installed ($(etcd --version 2>/dev/null | head -n1))"
    exit 0
fi

fail() {
    echo "setup-etcd: ERROR: $*" >&2
    echo "setup-etcd: install it by hand (Debian/Ubuntu: apt-get install etcd-server)," \
         "or put an etcd binary on PATH, then run this script again." >&2
    exit 1
}

apt_install setup-etcd etcd-server || fail "could not install etcd-server"
command -v etcd >/dev/null 2>&1 || fail "etcd-server installed, but no etcd binary on PATH"
echo "setup-etcd: ok: $(etcd --version | head -n1)"
