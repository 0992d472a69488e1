#!/usr/bin/env bash
# Screenshots of every console page for docs/console.md: the browser tests take them
# (tests/integration/test_console.py) against a real server, in Debian's Chromium.
# Usage: scripts/console-shots.sh [DIR]   (default docs/console)
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-docs/console}")"
rm -rf "$out" && mkdir -p "$out"
run="python3 -m pytest -q -p no:cacheprovider tests/integration/test_console.py"
if [ "$(id -u)" -eq 0 ] && unshare -n true 2>/dev/null; then
  POSTROOM_SCREENSHOTS="$out" unshare -n sh -c "ip link set lo up && $run"
else
  POSTROOM_SCREENSHOTS="$out" $run
fi
# smaller files: 256 colours are plenty for a UI (optipng/pngquant if present)
if command -v pngquant >/dev/null; then pngquant -f --ext .png --quality 70-95 "$out"/*.png || true; fi
ls -l "$out"
