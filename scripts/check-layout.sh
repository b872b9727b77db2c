#!/usr/bin/env bash
# The crate map's "never" arrows (docs/architecture.md), checked on the dependency graph cargo
# resolves, so the shape cannot silently regress:
#   - the router never links the compute kernels, nor the engine (it tokenizes with tandem-text);
#   - the text side (GGUF metadata, tokenizer, chat template) never links the kernels;
#   - the engine knows no gRPC, protobuf, etcd or cluster;
#   - the two worker roles never import each other (they meet only through the proto and kvtransfer);
#   - nothing below the cli depends on the cli;
#   - no function of the router or the workers is allowed clippy's too_many_arguments.
# Normal and build dependencies count (a dev-dependency links only into tests).
# Prints each broken arrow; exits 1 if there is one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

broken=0
# never CRATE DEP...: CRATE must not depend on any DEP, directly or through others.
never() {
    local crate=$1
    shift
    local tree
    tree=$(cargo tree --locked -e normal,build -p "$crate" --prefix none --format '{p}' 2>&1) || {
        echo "check-layout: cargo tree -p $crate failed: $tree" >&2
        exit 1
    }
    local deps
    deps=$(awk '{print $1}' <<<"$tree" | sort -u)
    for dep in "$@"; do
        if grep -qx -- "$dep" <<<"$deps"; then
            echo "check-layout: $crate depends on $dep (docs/architecture.md forbids it):" >&2
            cargo tree --locked -e normal,build -p "$crate" -i "$dep" 2>/dev/null | head -8 >&2 || true
            broken=1
        fi
    done
}

never tandem-router tandem-kernels tandem-engine
never tandem-text tandem-kernels tandem-engine
never tandem-engine tonic prost etcd-client tandem-proto tandem-cluster
never tandem-prefill-worker tandem-decode-worker
never tandem-decode-worker tandem-prefill-worker
never tandem-worker-runtime tandem-prefill-worker tandem-decode-worker tandem-router
for crate in tandem-kernels tandem-engine tandem-text tandem-kvtransfer tandem-cluster tandem-proto \
    tandem-worker-runtime tandem-prefill-worker tandem-decode-worker tandem-router; do
    never "$crate" tandem
done

# The request path takes its parameters as types, not as trains: no allowance for more than clippy's limit.
if allowed=$(grep -rn "clippy::too_many_arguments" --include=*.rs router worker-runtime prefill-worker decode-worker); then
    echo "check-layout: #[allow(clippy::too_many_arguments)] on the request path:" >&2
    echo "$allowed" >&2
    broken=1
fi

if [ "$broken" -ne 0 ]; then
    exit 1
fi
echo "check-layout: every arrow of the crate map holds"
