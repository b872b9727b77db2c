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
# shellcheck source=scripts/lib/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"

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

apt_install setup-etcd "${need[@]}" || fail "could not install ${need[*]}"

have_etcd || fail "etcd-server installed, but no etcd binary on PATH"
have_protoc || fail "protobuf-compiler installed, but protoc cannot find google/protobuf/descriptor.proto"
echo "setup-etcd: ok: $(etcd --version | head -n1); $(protoc --version)"
