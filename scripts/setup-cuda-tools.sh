#!/usr/bin/env bash
# Installs the CUDA compiler tools the PTX and NCCL tests need, without a GPU or a CUDA
# toolkit: NVRTC (run-time compiler), the CUDA runtime headers and ptxas, all from
# NVIDIA's pip wheels, into <repo>/.venv-cuda (git-ignored).
#
# Idempotent: does nothing when the venv already has all three wheels.
# Never fails the caller because the package index is unreachable: it prints why
# and exits 0. The CUDA tests then skip with the same reason, or fail under
# scripts/test.sh, which sets TANDEM_REQUIRE_TOOLS=1 (docs/operations.md).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv-cuda
PKGS=(nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12)
PY=${PYTHON:-python3}

have_all() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - <<'PY' 2>/dev/null
import glob, os, sys, sysconfig
sp = sysconfig.get_paths()["purelib"]
need = [
    "nvidia/cuda_nvrtc/lib/libnvrtc.so*",
    "nvidia/cuda_runtime/include/cuda_fp16.h",
    "nvidia/cuda_nvcc/bin/ptxas",
]
sys.exit(0 if all(glob.glob(os.path.join(sp, n)) for n in need) else 1)
PY
}

if have_all; then
    echo "setup-cuda-tools: $VENV already has ${PKGS[*]}"
    exit 0
fi

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "setup-cuda-tools: SKIP: $PY not found; the CUDA tests will skip (or fail, with TANDEM_REQUIRE_TOOLS=1)" >&2
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup-cuda-tools: creating $VENV"
    if ! "$PY" -m venv "$VENV"; then
        echo "setup-cuda-tools: SKIP: could not create a venv with $PY -m venv; the CUDA tests will skip (or fail, with TANDEM_REQUIRE_TOOLS=1)" >&2
        rm -rf "$VENV"
        exit 0
    fi
fi

echo "setup-cuda-tools: installing ${PKGS[*]} into $VENV"
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "${PKGS[@]}"; then
    echo "setup-cuda-tools: SKIP: pip could not install ${PKGS[*]} (is the package index reachable?);" \
         "the CUDA tests will skip (or fail, with TANDEM_REQUIRE_TOOLS=1)" >&2
    exit 0
fi

if have_all; then
    echo "setup-cuda-tools: ok"
else
    echo "setup-cuda-tools: WARNING: installed, but libnvrtc, cuda_fp16.h or ptxas was not found in $VENV" >&2
fi
