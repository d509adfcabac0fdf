"""Supervised training of one model (e.g. a teacher): ``accelerate launch train/train.py --config FILE``.

Example:
    accelerate launch --config_file configs/accelerate/ddp.yaml train/train.py \
        --config configs/train/teacher_mnist.yaml train.epochs=5
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: train/ must not shadow the `train` package on sys.path
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]


def main(argv: list[str] | None = None) -> int:
    from train.cli import run

    return run("Supervised training of one model.", argv, distill=False)


if __name__ == "__main__":
    sys.exit(main())
