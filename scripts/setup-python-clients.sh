#!/usr/bin/env bash
# Sets up the Python clients' virtualenv, <repo>/.venv-clients (git-ignored), with:
#   grpcio, grpcio-reflection, protobuf   for scripts/grpc-call.py (a grpcurl-like client
#                                         that learns the API through server reflection)
#   openai                                for talking to the OpenAI-compatible HTTP API
#   jsonschema                            for checking structured output against its schema
# and curl (apt), which the HTTP tests use to check the wire format; `--no-curl` leaves
# it out (scripts/up.sh --example needs only the gRPC client).
#
# Idempotent: pip runs only when the stamp file in the venv does not list exactly the
# requirements below, or when they no longer import. On Debian, where `python3 -m venv`
# needs the python3-venv package, installs it with apt-get (sudo when not root).
# FAILS (exit 1) when it cannot set the venv up.
#
# Environment:
#   PYTHON   interpreter for the venv (default: python3)
#   FORCE=1  reinstall the requirements even when the stamp says they are there
set -euo pipefail
# shellcheck source=scripts/lib/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_NAME=.venv-clients
VENV="$ROOT/$VENV_NAME"
PYTHON="${PYTHON:-python3}"
FORCE="${FORCE:-0}"
# The requirements, installed in one pip call. The stamp records this list.
REQUIREMENTS=(grpcio grpcio-reflection protobuf openai jsonschema)
STAMP="$VENV/.requirements"
VPY="$VENV/bin/python"

fail() {
    echo "setup-python-clients: ERROR: $*" >&2
    exit 1
}

command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found (set PYTHON to a Python 3.11+ interpreter)"

# `python3 -m venv` works only with ensurepip, which Debian ships in python3-venv.
have_venv() { "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; }


install_python3_venv() {
    apt_install setup-python-clients python3-venv || exit 1
    have_venv || fail "python3-venv installed, but $PYTHON still cannot make a venv (is $PYTHON Debian's python3?)"
}

if [ "${1:-}" != --no-curl ]; then
    command -v curl >/dev/null 2>&1 || apt_install setup-python-clients curl ca-certificates || exit 1
fi

requirements_ok() {
    [ "$FORCE" != 1 ] || return 1
    [ -f "$STAMP" ] || return 1
    [ "$(cat "$STAMP")" = "$(printf '%s\n' "${REQUIREMENTS[@]}")" ] || return 1
    "$VPY" -c 'import grpc, grpc_reflection, google.protobuf, openai, jsonschema' >/dev/null 2>&1
}

# 1. The venv. One whose interpreter no longer runs (the base Python was upgraded or
#    removed, or an earlier run died half-way) is made again from scratch.
if ! "$VPY" -c 'import sys' >/dev/null 2>&1 || ! "$VPY" -m pip --version >/dev/null 2>&1; then
    have_venv || install_python3_venv
    echo "setup-python-clients: creating $VENV_NAME"
    "$PYTHON" -m venv --clear "$VENV" || fail "$PYTHON -m venv $VENV_NAME failed"
fi

# 2. The requirements.
if requirements_ok; then
    action="already installed"
else
    echo "setup-python-clients: installing ${REQUIREMENTS[*]}"
    rm -f "$STAMP"
    "$VPY" -m pip install --quiet --disable-pip-version-check --upgrade "${REQUIREMENTS[@]}" \
        || fail "pip install ${REQUIREMENTS[*]} failed"
    "$VPY" -c 'import grpc, grpc_reflection, google.protobuf, openai, jsonschema' \
        || fail "installed ${REQUIREMENTS[*]}, but they do not import"
    printf '%s\n' "${REQUIREMENTS[@]}" >"$STAMP"
    action="installed"
fi

versions=$("$VPY" - "${REQUIREMENTS[@]}" <<'EOF'
import sys
from importlib.metadata import version
print(", ".join(f"{name} {version(name)}" for name in sys.argv[1:]))
EOF
)
echo "setup-python-clients: ok ($action): $VENV_NAME, Python $("$VPY" -c 'import platform; print(platform.python_version())'); $versions"
