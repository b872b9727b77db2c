#!/usr/bin/env bash
# What `tandem bench serve --plot` needs beyond the binary: a TrueType font
# (Debian's fonts-dejavu-core) for the charts' text. Idempotent.
set -euo pipefail
# shellcheck source=scripts/lib/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"

FONT=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
if [ -f "$FONT" ]; then
    echo "setup-bench: ok (DejaVu Sans present)"
    exit 0
fi
apt_install setup-bench fonts-dejavu-core || exit 1
[ -f "$FONT" ] || { echo "setup-bench: ERROR: fonts-dejavu-core installed but DejaVuSans.ttf is missing" >&2; exit 1; }
echo "setup-bench: ok (fonts-dejavu-core installed)"
