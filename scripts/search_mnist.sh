#!/usr/bin/env bash
# bash scripts/search_mnist.sh [WORKERS]
# The 40-trial compression search on the embedded MNIST-5k (configs/search/mnist.yaml) with WORKERS processes (default
# 2) sharing one study; trains the demo's teacher first when runs/mnist/teacher is missing. Report:
# runs/search/mnist/search_report.json and pareto.md (docs/search.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
WORKERS=${1:-2}
if [ ! -f runs/mnist/teacher/checkpoint/slimforge.json ]; then
  $BIN/accelerate launch --config_file configs/accelerate/single.yaml train/train.py \
    --config configs/train/teacher_mnist.yaml train.output_dir=runs/mnist/teacher
fi
pids=()
for _ in $(seq "$WORKERS"); do
  $BIN/python export/search.py --config configs/search/mnist.yaml &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
$BIN/python export/search.py --config configs/search/mnist.yaml --report-only
exit $rc
