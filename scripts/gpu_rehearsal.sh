#!/usr/bin/env bash
# bash scripts/gpu_rehearsal.sh OUT [PYTEST ARGS...]
# Rehearses the GPU check's start here, without a GPU and without the package registry, the way the GPU machine
# sees it: (1) .gpu_image_venv/ gets the image's share of slimforge's environment at the image's versions
# (scripts/gpu_wheels.py image-requirements; the only step that uses the registry), (2) in a network namespace with
# no network but loopback and pip's index and configuration off, scripts/gpu_check.sh --dry-run OUT installs from the wheelhouse
# alone into .gpu_venv/ over those packages and checks every item's setup, (3) with PYTEST ARGS (e.g. -m "not slow"),
# the test suite runs in that environment, still offline. Needs .gpu_wheels/ (bash scripts/gpu_check.sh --prepare),
# root for `unshare -n`, and a Python of the image's version (PYTHON312, default python3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/gpu_rehearsal.sh OUT [PYTEST ARGS...]" >&2
  exit 2
fi
OUT=$1
shift
if [ ! -f .gpu_wheels/manifest.json ]; then
  echo "gpu_rehearsal: .gpu_wheels/manifest.json is missing: run bash scripts/gpu_check.sh --prepare first" >&2
  exit 1
fi
PY=${PYTHON312:-python3.12}
if ! "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12)' > /dev/null 2>&1; then
  echo "gpu_rehearsal: '$PY' is not a working Python 3.12 (the GPU image's version): set PYTHON312=/path/to/python3.12" >&2
  exit 1
fi
IMG=.gpu_image_venv
if [ ! -x "$IMG/bin/python" ]; then
  "$PY" -m venv "$IMG"
fi
python3 scripts/gpu_wheels.py image-requirements > "$IMG/requirements.txt"
echo "[rehearsal] the image's packages into $IMG ($(wc -l < "$IMG/requirements.txt") requirements)"
"$IMG/bin/python" -m pip install --quiet --disable-pip-version-check -r "$IMG/requirements.txt"
rm -rf .gpu_venv
# A new network namespace has no network at all, its loopback down too: bring loopback up (the launches'
# rendezvous uses it), nothing else.
offline() { unshare -n sh -c 'ip link set lo up && exec "$@"' sh env PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 "$@"; }
echo "[rehearsal] offline: gpu_check.sh --dry-run $OUT over $IMG"
offline PYTHON="$IMG/bin/python" bash scripts/gpu_check.sh --dry-run "$OUT"
if [ $# -gt 0 ]; then
  echo "[rehearsal] offline: pytest $* in .gpu_venv"
  offline .gpu_venv/bin/python -m pytest -p no:cacheprovider "$@"
fi
