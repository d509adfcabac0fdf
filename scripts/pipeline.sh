#!/usr/bin/env bash
# bash scripts/pipeline.sh runs/mnist
# teacher → distilled student → pruned and distilled again → quantisation-aware training with the teacher →
# verified ONNX / TorchScript / int8 ONNX → benchmark of the whole chain vs the teacher, in an existing .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/mnist}
BIN=.venv/bin
# One process per GPU; 2 CPU processes over gloo on a machine without a GPU.
NPROC=$($BIN/python -c "import torch; print(torch.cuda.device_count() or 2)")
t0=$SECONDS

echo "== 1/6 train the teacher ($RUN/teacher)"
$BIN/accelerate launch --config_file configs/accelerate/single.yaml train/train.py \
  --config configs/train/teacher_mnist.yaml train.output_dir="$RUN/teacher" train.overwrite=true

echo "== 2/6 distil the student with $NPROC processes ($RUN/student)"
$BIN/accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes "$NPROC" train/distill.py \
  --config configs/distill/mnist_resnet18_to_resnet10t.yaml \
  teacher.checkpoint="$RUN/teacher/checkpoint" train.output_dir="$RUN/student" train.overwrite=true

echo "== 3/6 prune 45% of the student's MACs (channel counts multiples of 8), then distil it back ($RUN/student_pruned)"
$BIN/accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes "$NPROC" train/distill.py \
  --config configs/distill/mnist_resnet10t_pruned.yaml model.checkpoint="$RUN/student/checkpoint" \
  teacher.checkpoint="$RUN/teacher/checkpoint" train.output_dir="$RUN/student_pruned" train.overwrite=true

echo "== 4/6 quantisation-aware training of the pruned student, the teacher guiding it ($RUN/student_qat)"
$BIN/accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes "$NPROC" train/distill.py \
  --config configs/distill/mnist_resnet10t_qat.yaml model.checkpoint="$RUN/student_pruned/checkpoint" \
  teacher.checkpoint="$RUN/teacher/checkpoint" train.output_dir="$RUN/student_qat" train.overwrite=true

echo "== 5/6 export the FP32 student ($RUN/export), the pruned one ($RUN/export_pruned) and the int8 one"
echo "       ($RUN/export_int8), each checked against PyTorch on validation images"
$BIN/python export/export.py --checkpoint "$RUN/student/checkpoint" --out "$RUN/export"
$BIN/python export/export.py --checkpoint "$RUN/student_pruned/checkpoint" --out "$RUN/export_pruned" --formats onnx
$BIN/python export/export.py --checkpoint "$RUN/student_qat/checkpoint" --out "$RUN/export_int8"

echo "== 6/6 benchmark the chain against the FP32 teacher: student, pruned student, pruned int8 ($RUN/benchmark)"
$BIN/python export/benchmark.py --teacher "$RUN/teacher/checkpoint" --student "$RUN/student/checkpoint" \
  "$RUN/export/model.onnx" "$RUN/export/model.ts" "$RUN/export_pruned/model.onnx" \
  "$RUN/export_int8/model.int8.onnx" --out "$RUN/benchmark"

echo "== done in $((SECONDS - t0)) s: $RUN/benchmark/benchmark.md"
