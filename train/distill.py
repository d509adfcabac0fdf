"""Teacher → student logit distillation: ``accelerate launch train/distill.py --config FILE``.

The teacher (``teacher.checkpoint``) is frozen, runs without autograd on every rank and is never wrapped,
optimised or saved; only the student is trained and written. See ``train/losses.py`` for the loss.

Example:
    accelerate launch --config_file configs/accelerate/ddp.yaml train/distill.py \
        --config configs/distill/mnist_resnet18_to_resnet10t.yaml
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from slimforge.train.cli import run

    return run("Teacher-student knowledge distillation.", argv, distill=True)


if __name__ == "__main__":
    sys.exit(main())
