#!/usr/bin/env bash
# bash scripts/demo.sh
# The end-to-end job on the embedded MNIST-5k (no download): set up .venv, train the FP32 teacher, distil a
# smaller student with `accelerate launch` (2 processes: one per GPU, or 2 CPU processes over gloo), prune half of
# its MACs away and distil it back, fine-tune the pruned student with quantisation-aware training while the
# teacher guides it, export the FP32 students to ONNX + TorchScript and the QAT one to int8 QDQ ONNX (each checked
# on real validation images; int8 must run in integer kernels), and benchmark the whole chain against the teacher.
# RUN=<folder> picks the output folder (default runs/mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash scripts/pipeline.sh "${RUN:-runs/mnist}"
