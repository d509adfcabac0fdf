#!/usr/bin/env bash
# bash scripts/setup.sh
# Creates .venv (once) and installs slimforge editable with everything it needs, from the package registry, at the
# exact versions the tests ran with (scripts/constraints.txt; pyproject.toml declares the ranges slimforge accepts).
# EXTRAS picks the optional groups: bench (OpenVINO rows, the report's plot), dev (pytest, ruff), deepspeed.
# e.g. `EXTRAS=bench,dev,deepspeed bash scripts/setup.sh`. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-bench,dev}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
echo "[setup] installing slimforge[$EXTRAS] into .venv (torch takes about a minute)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c scripts/constraints.txt -e ".[$EXTRAS]"
.venv/bin/python -c "import torch, timm, accelerate, datasets, onnxruntime; print('[setup] torch', torch.__version__, '| timm', timm.__version__, '| accelerate', accelerate.__version__, '| onnxruntime', onnxruntime.__version__, '| CUDA', torch.cuda.is_available())"
