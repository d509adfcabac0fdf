#!/usr/bin/env bash
# bf16 under every data-parallel strategy, side by side: the same supervised run (timm resnet10t on the embedded
# MNIST-5k, 4,000 train / 1,000 validation digits) under DDP (bf16 autocast) and DeepSpeed ZeRO-1/2/3 (bf16 weights,
# FP32 masters), 2 processes each. Prints each run's validation accuracy, what its weights were held in and the
# dtype of the saved student.
#
#   bash scripts/bench_precision.sh [RUN_ROOT] [EPOCHS]      # default runs/bench_precision, 3 epochs
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/bench_precision}
EPOCHS=${2:-3}
PY=.venv/bin/python

for launch in ddp zero1 zero2 zero3; do
  .venv/bin/accelerate launch --config_file "configs/accelerate/$launch.yaml" train/train.py \
    --config configs/train/teacher_mnist.yaml model.name=resnet10t data.batch_size=32 \
    train.mixed_precision=bf16 train.epochs="$EPOCHS" train.tensorboard=false train.overwrite=true \
    train.output_dir="$RUN/$launch" > "$RUN.$launch.log" 2>&1 || { tail -20 "$RUN.$launch.log"; exit 1; }
done

"$PY" - "$RUN" <<'EOF'
import json, sys
from pathlib import Path

from safetensors import safe_open

root = Path(sys.argv[1])
rows = []
for launch in ("ddp", "zero1", "zero2", "zero3"):
    summary = json.loads((root / launch / "summary.json").read_text())
    with safe_open(str(root / launch / "checkpoint" / "model.safetensors"), "pt") as f:
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    top = summary["topology"]
    rows.append((launch, summary["val_acc"], top["weights"], top["master_weights"], summary["train_compute_dtype"],
                 ",".join(dtypes)))
ddp = rows[0][1]
print(f"{'launch':8} {'val acc':>8} {'vs DDP':>8}  weights   master weights                        compute         saved")
for launch, acc, weights, master, compute, saved in rows:
    print(f"{launch:8} {acc:8.4f} {100 * (acc - ddp):+7.2f}pt  {weights:9} {master:37} {compute:15} {saved}")
EOF
