"""Supervised training of one model (e.g. a teacher): ``accelerate launch train/train.py --config FILE``.

Example:
    accelerate launch --config_file configs/accelerate/ddp.yaml train/train.py \
        --config configs/train/teacher_mnist.yaml train.epochs=5
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from slimforge.train.cli import run

    return run("Supervised training of one model.", argv, distill=False)


if __name__ == "__main__":
    sys.exit(main())
