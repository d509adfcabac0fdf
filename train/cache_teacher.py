"""Run the teacher once and store its outputs: ``accelerate launch train/cache_teacher.py --config FILE``.

For every training sample and each of ``cache.epochs`` epochs, the frozen teacher's logits on the exact augmented
view the student will see then (each rank its share of the samples), kept as the top ``cache.topk`` classes (all by
default) in ``cache.dtype``. ``train/distill.py`` with ``train.teacher_placement=cached`` and the same run config
then distils without running the teacher. See ``train/teacher_cache.py`` and ``train/engine/cache.py``.

Example:
    accelerate launch --config_file configs/accelerate/ddp.yaml train/cache_teacher.py \
        --config configs/distill/mnist_resnet18_to_resnet10t.yaml cache.path=runs/mnist/teacher_cache
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from slimforge.train.cli import parse_args
    from slimforge.train.config import load_config
    from slimforge.train.engine.cache import build_cache
    from slimforge.train.errors import SlimforgeError, report_error
    from slimforge.train.schema import RunConfig
    from slimforge.train.teacher_cache import cache_dir

    args = parse_args("Cache the teacher's outputs for distillation.", argv)
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        meta = build_cache(cfg)
    except SlimforgeError as e:
        return report_error(e)
    if meta.get("bytes") is not None:  # rank 0
        size = f"{meta['bytes'] / 1e6:.1f} MB"
        print(f"{cache_dir(cfg)}: {meta['epochs']} epoch(s) × {meta['num_samples']} samples, top-{meta['topk']} of "
              f"{meta['num_classes']} classes, {size}; teacher val acc {meta['teacher_val_acc']:.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
