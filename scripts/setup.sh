#!/usr/bin/env bash
# bash scripts/setup.sh
# Creates .venv (once) and installs slimforge editable with everything it needs, from the package registry.
# torch/torchvision are pinned in pyproject.toml (see ../shared/FACTS.md for why these releases).
# Extra pip arguments pass through, e.g. `bash scripts/setup.sh` then `EXTRAS=dev,deepspeed bash scripts/setup.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
echo "[setup] installing slimforge[$EXTRAS] into .venv (torch takes about a minute)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
.venv/bin/python -c "import torch, timm, accelerate, datasets, onnxruntime; print('[setup] torch', torch.__version__, '| timm', timm.__version__, '| accelerate', accelerate.__version__, '| onnxruntime', onnxruntime.__version__, '| CUDA', torch.cuda.is_available())"
