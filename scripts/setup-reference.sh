#!/usr/bin/env bash
# Set up the llama.cpp reference used to make test fixtures and to compare speed.
#
#   <repo>/.venv-ref   venv with llama-cpp-python (built from source), jinja2, numpy
#   <repo>/.ref/bin    llama-bench and llama-server, built from the llama.cpp source
#                      vendored inside the same llama-cpp-python sdist
#
# Both builds are non-native (GGML_NATIVE=OFF) with AVX/AVX2/FMA/F16C/AVX512/
# AVX512_VNNI switched on explicitly and AMX left off (AMX instructions crash in
# some VMs). Idempotent: finished steps are skipped. Not run by CI.
#
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  version to use (default: the pinned one below)
#   PYTHON                    interpreter for the venv (default: python3)
#   JOBS                      build parallelism (default: 2)
#   FORCE=1                   rebuild everything
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-ref"
REF="$ROOT/.ref"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
FORCE="${FORCE:-0}"

GGML_FLAGS=(
    -DGGML_NATIVE=OFF
    -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
    -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)

export MAKEFLAGS="-j$JOBS"
export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"

log() { echo "[setup-reference] $*"; }
START=$(date +%s)

# 1. venv + build tools -------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv .venv-ref"
    "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --upgrade pip
"$VPY" -m pip install --quiet jinja2 numpy cmake ninja scikit-build-core
CMAKE="$VENV/bin/cmake"

# 2. llama-cpp-python sdist -----------------------------------------------------
SDIST_DIR="$REF/sdist"
mkdir -p "$SDIST_DIR"
SDIST="$(ls "$SDIST_DIR"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null | head -n 1 || true)"
if [[ -z "$SDIST" ]]; then
    log "downloading llama-cpp-python $VERSION sdist"
    # --no-build-isolation: pip only reads the sdist's metadata, using the
    # scikit-build-core/cmake installed above (with isolation and
    # --no-binary :all: pip would build cmake itself from source).
    "$VPY" -m pip download --quiet --no-binary :all: --no-deps --no-build-isolation \
        --dest "$SDIST_DIR" "llama-cpp-python==$VERSION"
    SDIST="$(ls "$SDIST_DIR"/llama_cpp_python-"$VERSION".tar.gz | head -n 1)"
fi
SRC="$REF/src/llama_cpp_python-$VERSION"
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
    log "unpacking sdist"
    mkdir -p "$REF/src"
    tar -xzf "$SDIST" -C "$REF/src"
fi

# 3. llama-cpp-python in the venv ----------------------------------------------
INSTALLED="$("$VPY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)"
if [[ "$FORCE" == "1" || "$INSTALLED" != "$VERSION" ]]; then
    log "building llama-cpp-python $VERSION from source (several minutes)"
    t0=$(date +%s)
    CMAKE_ARGS="${GGML_FLAGS[*]} -DLLAMA_CURL=OFF" FORCE_CMAKE=1 \
        "$VPY" -m pip install --no-cache-dir --no-binary llama-cpp-python \
        --no-build-isolation --force-reinstall --no-deps "$SDIST"
    # runtime deps of llama-cpp-python (pure python)
    "$VPY" -m pip install --quiet typing-extensions diskcache
    log "llama-cpp-python built in $(( $(date +%s) - t0 ))s"
else
    log "llama-cpp-python $VERSION already installed"
fi

# 4. llama-bench / llama-server ------------------------------------------------
BIN="$REF/bin"
if [[ "$FORCE" == "1" || ! -x "$BIN/llama-bench" || ! -x "$BIN/llama-server" \
      || "$(cat "$BIN/.version" 2>/dev/null)" != "$VERSION" ]]; then
    log "building llama-bench and llama-server (several minutes)"
    t0=$(date +%s)
    BUILD="$REF/build"
    "$CMAKE" -S "$SRC/vendor/llama.cpp" -B "$BUILD" -G Ninja \
        -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
        "${GGML_FLAGS[@]}"
    "$CMAKE" --build "$BUILD" --config Release -j "$JOBS" --target llama-bench llama-server
    mkdir -p "$BIN"
    cp -f "$BUILD/bin/llama-bench" "$BUILD/bin/llama-server" "$BIN/"
    echo "$VERSION" > "$BIN/.version"
    log "llama-bench/llama-server built in $(( $(date +%s) - t0 ))s"
else
    log "llama-bench and llama-server already built"
fi

log "done in $(( $(date +%s) - START ))s"
log "  python:       .venv-ref/bin/python ($("$VPY" -c 'import llama_cpp; print(llama_cpp.__version__)'))"
log "  llama-bench:  .ref/bin/llama-bench"
log "  llama-server: .ref/bin/llama-server"
