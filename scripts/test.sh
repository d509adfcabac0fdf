#!/usr/bin/env bash
# bash scripts/test.sh
# Sets up .venv (as scripts/setup.sh) and runs the test suite. Extra arguments go to pytest, e.g. `-m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests launch DeepSpeed ZeRO runs too: install that extra.
EXTRAS=bench,dev,deepspeed bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
