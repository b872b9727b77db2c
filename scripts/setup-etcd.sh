#!/usr/bin/env bash
# Installs what the cluster crate needs to build and test, from Debian's packages:
#   etcd                          (etcd-server)        the real etcd that cluster/tests/etcd.rs starts
#   protoc + well-known types     (protobuf-compiler,  run by etcd-client's build script, whose
#                                  libprotobuf-dev)     protos import google/protobuf/*.proto
#
# Idempotent: does nothing when etcd is on PATH and protoc compiles a file importing
# google/protobuf/descriptor.proto. Unlike the optional tool set-ups, this one FAILS
# (exit 1) when it cannot install them: without protoc the workspace does not build,
# and without etcd the etcd tests fail.
set -euo pipefail

have_etcd() { command -v etcd >/dev/null 2>&1; }

have_protoc() {
    command -v protoc >/dev/null 2>&1 || return 1
    local dir ok=0
    dir=$(mktemp -d)
    printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\n' >"$dir/probe.proto"
    protoc -I"$dir" --descriptor_set_out="$dir/probe.pb" "$dir/probe.proto" >/dev/null 2>&1 || ok=1
    rm -rf "$dir"
    return $ok
}

need=()
have_etcd || need+=(etcd-server)
have_protoc || need+=(protobuf-compiler libprotobuf-dev)

if [ ${#need[@]} -eq 0 ]; then
    echo "setup-etcd: etcd and protoc already installed ($(etcd --version 2>/dev/null | head -n1); $(protoc --version))"
    exit 0
fi

fail() {
    echo "setup-etcd: ERROR: $*" >&2
    echo "setup-etcd: install them by hand (Debian/Ubuntu: apt-get install ${need[*]})," \
         "or put an etcd binary and a protoc that finds google/protobuf/*.proto on PATH," \
         "then run this script again." >&2
    exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "apt-get not found, cannot install ${need[*]}"

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "not root and sudo not found, cannot install ${need[*]}"
    SUDO=(sudo -n)
fi

export DEBIAN_FRONTEND=noninteractive
echo "setup-etcd: installing ${need[*]}"
# Try without refreshing the package lists first (fast when they are current),
# then once more after apt-get update.
if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
    "${SUDO[@]}" apt-get update -qq || fail "apt-get update failed (is the package mirror reachable?)"
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" \
        || fail "apt-get install ${need[*]} failed"
fi

have_etcd || fail "etcd-server installed, but no etcd binary on PATH"
have_protoc || fail "protobuf-compiler installed, but protoc cannot find google/protobuf/descriptor.proto"
echo "setup-etcd: ok: $(etcd --version | head -n1); $(protoc --version)"
