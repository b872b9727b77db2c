#!/usr/bin/env bash
# The project's test command (README, CI): fetch what the tests need, then run them all.
# Idempotent; safe to run on a fresh machine with Rust, Python 3 and pip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/fetch-model.sh
# etcd for cluster/tests/etcd.rs; protoc + google/protobuf/*.proto for etcd-client's build script.
scripts/setup-etcd.sh
# CUDA code is compiled and checked here, never run: NVRTC/ptxas from PyPI wheels, and the
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
# Incremental state would add ~2 GB to a one-shot build; a caller may still ask for it.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo check -p tandem-kvtransfer --features cuda --locked
cargo test --workspace --locked "$@"
