#!/usr/bin/env bash
# bash scripts/screenshot_report.sh runs/mnist/benchmark/benchmark.html runs/mnist/benchmark/benchmark.png
# Opens a benchmark HTML report in headless Chromium (Debian: apt-get install -y chromium) and saves a screenshot,
# proof that the page renders on its own (no network, no external files). WINDOW=WxH changes the viewport.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 REPORT.html OUT.png" >&2
  exit 2
fi
REPORT=$(realpath "$1")
OUT=$(realpath -m "$2")
[ -f "$REPORT" ] || { echo "error: $REPORT does not exist" >&2; exit 2; }
BROWSER=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$BROWSER" ] || { echo "error: no chromium on PATH; fix: apt-get update && apt-get install -y chromium" >&2; exit 2; }
PROFILE=$(mktemp -d)
trap 'rm -rf "$PROFILE"' EXIT
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
# --no-sandbox: Chromium refuses to run as root with its sandbox; the page is our own local file.
"$BROWSER" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$PROFILE" \
  --window-size="${WINDOW:-1400,1800}" --screenshot="$OUT" "file://$REPORT" >/dev/null 2>&1 || true
[ -s "$OUT" ] || { echo "error: chromium wrote no screenshot to $OUT" >&2; exit 1; }
echo "$OUT"
