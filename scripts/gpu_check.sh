#!/usr/bin/env bash
# bash scripts/gpu_check.sh OUT
# Runs every GPU-only path once on the embedded MNIST (DDP bf16/fp16, ZeRO-2/3, FSDP with a SIGKILL and resume,
# the sharded teacher, export parity on CUDA, the benchmark's GPU rows) and writes OUT/gpu_check.json and
# OUT/gpu_check.md: per item pass/fail/skipped, its figure and its error. About 5-8 minutes on one H100.
# Exit status: 0 all passed (or skipped with a reason), 1 an item failed, 2 usage, 3 no GPU on this machine
# (decided before anything is installed or started).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ]; then
  echo "usage: bash scripts/gpu_check.sh OUT" >&2
  exit 2
fi
if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi is missing or lists none): nothing to check. Run it on a GPU machine." >&2
  exit 3
fi
# The ZeRO items need the deepspeed extra; setup.sh is a no-op when .venv is already complete.
EXTRAS=bench,deepspeed bash scripts/setup.sh || exit 1
exec .venv/bin/python scripts/gpu_check.py --out "$1"
