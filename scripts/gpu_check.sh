#!/usr/bin/env bash
# bash scripts/gpu_check.sh --prepare        # here, where the package registry is reachable (no GPU needed)
# bash scripts/gpu_check.sh OUT              # on the GPU machine, offline
# bash scripts/gpu_check.sh --dry-run OUT    # anywhere: install as on the GPU machine, then check every item's setup
#
# --prepare sets up .venv (scripts/setup.sh) and writes the wheelhouse .gpu_wheels/ (what the GPU machine's image
# lacks, for its Python; scripts/gpu_wheels.py, manifest.json) for the GPU machine's working tree to carry.
# OUT installs slimforge and the wheelhouse with pip's index disabled into .gpu_venv/, over the image's own packages
# (torch, torchvision, numpy and onnxruntime are never replaced), records the image's package list in
# OUT/image_packages.txt, and runs the GPU items in order of value under a time budget (GPU_CHECK_BUDGET seconds,
# default 480), writing OUT/gpu_check.{json,md} after every item (scripts/gpu_check.py; docs/gpu.md).
# PYTHON picks the image's interpreter (default python3); GPU_CHECK_ARGS adds arguments to gpu_check.py.
# Exit status: 0 all passed (or skipped with a reason), 1 an item failed or the install did, 2 usage, 3 no GPU on
# this machine (decided before anything is installed or started).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
usage() {
  echo "usage: bash scripts/gpu_check.sh OUT | --prepare | --dry-run OUT" >&2
  exit 2
}
[ $# -ge 1 ] || usage
case "$1" in
  --prepare)
    [ $# -eq 1 ] || usage
    EXTRAS=${EXTRAS:-bench,dev,deepspeed} bash scripts/setup.sh || exit 1
    exec .venv/bin/python scripts/gpu_wheels.py prepare
    ;;
  --dry-run)
    [ $# -eq 2 ] || usage
    OUT=$2
    DRY=--dry-run
    ;;
  -*) usage ;;
  *)
    [ $# -eq 1 ] || usage
    OUT=$1
    DRY=
    if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > /dev/null 2>&1; then
      echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi is missing or lists none): nothing to check. Run it on a GPU machine." >&2
      exit 3
    fi
    ;;
esac
mkdir -p "$OUT"
"$PYTHON" -m pip list --format=freeze --disable-pip-version-check > "$OUT/image_packages.txt" 2> /dev/null
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$PYTHON" scripts/gpu_wheels.py install || exit 1
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of arguments
exec .gpu_venv/bin/python scripts/gpu_check.py --out "$OUT" --budget "${GPU_CHECK_BUDGET:-480}" $DRY ${GPU_CHECK_ARGS:-}
