#!/usr/bin/env bash
# bash scripts/pipeline.sh runs/mnist
# teacher → distilled student → quantisation-aware training with the teacher → verified ONNX / TorchScript /
# int8 ONNX → benchmark vs the teacher, in an existing .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/mnist}
BIN=.venv/bin
# One process per GPU; 2 CPU processes over gloo on a machine without a GPU.
NPROC=$($BIN/python -c "import torch; print(torch.cuda.device_count() or 2)")
t0=$SECONDS

echo "== 1/5 train the teacher ($RUN/teacher)"
$BIN/accelerate launch --config_file configs/accelerate/single.yaml train/train.py \
  --config configs/train/teacher_mnist.yaml train.output_dir="$RUN/teacher" train.overwrite=true

echo "== 2/5 distil the student with $NPROC processes ($RUN/student)"
$BIN/accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes "$NPROC" train/distill.py \
  --config configs/distill/mnist_resnet18_to_resnet10t.yaml \
  teacher.checkpoint="$RUN/teacher/checkpoint" train.output_dir="$RUN/student" train.overwrite=true

echo "== 3/5 quantisation-aware training of the student, the teacher guiding it ($RUN/student_qat)"
$BIN/accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes "$NPROC" train/distill.py \
  --config configs/distill/mnist_resnet10t_qat.yaml model.checkpoint="$RUN/student/checkpoint" \
  teacher.checkpoint="$RUN/teacher/checkpoint" train.output_dir="$RUN/student_qat" train.overwrite=true

echo "== 4/5 export the FP32 student ($RUN/export) and the int8 one ($RUN/export_int8), each checked"
$BIN/python export/export.py --checkpoint "$RUN/student/checkpoint" --out "$RUN/export"
$BIN/python export/export.py --checkpoint "$RUN/student_qat/checkpoint" --out "$RUN/export_int8"

echo "== 5/5 benchmark the FP32 and int8 students against the FP32 teacher ($RUN/benchmark)"
$BIN/python export/benchmark.py --teacher "$RUN/teacher/checkpoint" --student "$RUN/student/checkpoint" \
  "$RUN/export/model.onnx" "$RUN/export/model.ts" "$RUN/export_int8/model.int8.onnx" --out "$RUN/benchmark"

echo "== done in $((SECONDS - t0)) s: $RUN/benchmark/benchmark.md"
