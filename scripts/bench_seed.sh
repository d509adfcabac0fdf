#!/usr/bin/env bash
# bash scripts/bench_seed.sh runs/seed
# (the argument is the output folder, default runs/seed)
# The seed comparison, reproduced: ResNet-50 at 384×384, batch 1 — PyTorch eager FP32 (the reference) vs bf16
# autocast vs channels_last vs TorchScript vs ONNX Runtime FP32 vs OpenVINO (its default precision, and pinned to FP32) vs int8
# (onnxruntime quantize_static, QDQ per-channel, in ORT and OpenVINO), on this CPU and, when one is visible, the GPU
# (CUDA rows are listed as skipped with the reason otherwise).
# The model is a randomly initialised timm resnet50 (no weight download) with a 10-class head on synthetic
# 384×384 images: latency, throughput, memory and precision are real; accuracy and agreement are not meaningful.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/seed}
BIN=.venv/bin
NOTE="Random-init timm resnet50 (no downloaded weights), 10 classes, synthetic 384x384 images: accuracy and \
agreement are meaningless here; latency, throughput, memory and precision are real."
t0=$SECONDS

echo "== 1/3 random-init resnet50 checkpoint at 384x384 ($OUT/checkpoint)"
$BIN/python - "$OUT/checkpoint" <<'PY'
import sys
from dataclasses import asdict

import torch

from slimforge.train.checkpoint import save_checkpoint
from slimforge.train.data import DataConfig, describe
from slimforge.train.models import ModelConfig, build_model

# Synthetic class-coded images give the benchmark real validation and calibration images without a download.
data = DataConfig(source="synthetic", image_size=384, in_chans=3, synthetic_samples=320, synthetic_classes=10)
torch.manual_seed(0)
info = describe(data)
model, spec = build_model(ModelConfig(name="resnet50"), data.synthetic_classes, info["input_size"], info)
print(save_checkpoint(model.state_dict(), spec, sys.argv[1], extra={"data": asdict(data), "weights": "random init"}))
PY

echo "== 2/3 export: ONNX, TorchScript, int8 ONNX (quantize_static QDQ per-channel) ($OUT/export)"
# Random init leaves logits nearly tied, so int8 top-1 agreement can drop for reasons unrelated to quantisation:
# ask only 0.5 here, which still catches a broken quantisation (a trained model is held to the default 0.9).
$BIN/python export/export.py --checkpoint "$OUT/checkpoint" --out "$OUT/export" \
  --formats onnx torchscript onnx-int8 --max-images 32 --calibration-images 64 --int8-min-agreement 0.5

echo "== 3/3 benchmark at batch 1 against eager FP32 ($OUT/benchmark)"
$BIN/python export/benchmark.py --teacher "$OUT/checkpoint" \
  --student "$OUT/checkpoint@torch-eager-bf16" "$OUT/checkpoint@torch-eager-cl" "$OUT/checkpoint@torch-eager-cuda" \
  "$OUT/export/model.ts" "$OUT/export/model.onnx" "$OUT/export/model.int8.onnx" \
  --runtimes torchscript torchscript-cuda ort-cpu ort-cuda ort-tensorrt openvino openvino-fp32 \
  --batch-sizes 1 --max-images 32 --note "$NOTE" --out "$OUT/benchmark"

echo "== done in $((SECONDS - t0)) s: $OUT/benchmark/benchmark.md, $OUT/benchmark/benchmark.html"
