#!/usr/bin/env bash
# Put llama.cpp's Llama 3 vocabulary (a vocabulary-only GGUF, no weights) in .vocab/ for the text
# crate's llama-bpe tests (text/tests/llama_bpe_reference.rs). llama.cpp ships it for its own
# tokenizer tests as models/ggml-vocab-llama-bpe.gguf, inside the llama-cpp-python sdist, which
# pip downloads. .vocab/ is git-ignored: the file is never committed.
#
# Idempotent: a file with the right sha256 is kept. The sdist is taken from .ref/sdist/ when
# scripts/setup-reference.sh has downloaded it, else downloaded to a temporary directory.
#
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  sdist version (default: the one pinned below)
#   PYTHON                    interpreter whose pip downloads it (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
DEST="$ROOT/.vocab"
NAME="ggml-vocab-llama-bpe.gguf"
SHA256="97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e"
MEMBER="llama_cpp_python-$VERSION/vendor/llama.cpp/models/$NAME"

log() { echo "[setup-vocab-fixtures] $*"; }

if [[ -f "$DEST/$NAME" && "$(sha256sum "$DEST/$NAME" | cut -d' ' -f1)" == "$SHA256" ]]; then
    log "present: .vocab/$NAME"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
sdist="$ROOT/.ref/sdist/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
    log "downloading the llama-cpp-python $VERSION sdist"
    # The sdist only (never a wheel); its build tools may come as wheels while pip reads its
    # metadata (with --no-binary :all: pip would compile cmake for that).
    "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python --dest "$tmp" \
        "llama-cpp-python==$VERSION"
    sdist="$tmp/llama_cpp_python-$VERSION.tar.gz"
fi

mkdir -p "$DEST"
tar -xzf "$sdist" -O "$MEMBER" >"$tmp/$NAME"
got="$(sha256sum "$tmp/$NAME" | cut -d' ' -f1)"
if [[ "$got" != "$SHA256" ]]; then
    echo "error: $NAME from the sdist has sha256 $got, expected $SHA256" >&2
    exit 1
fi
mv "$tmp/$NAME" "$DEST/$NAME"
log "extracted .vocab/$NAME"
