"""Compress a slimforge checkpoint in one shot (pruning, low-rank, post-training quantisation) and show what changed.

    python compress/compress.py --checkpoint runs/mnist/student/checkpoint --config configs/compress/prune_half.yaml \\
        --out runs/mnist/pruned

The config holds the recipe steps (``compress: [{method: prune, macs: 0.5}]``, as in a training config) and the
measurement settings (``slimforge.export.oneshot.OneShotConfig``); ``section.key=value``-style overrides follow it
(``calibration_images=512``). Writes ``OUT/checkpoint`` (the compressed model, its steps recorded) and
``OUT/compress_report.json``, and prints parameters, MACs, checkpoint size and ONNX Runtime latency at batch 1,
before and after, measured side by side. Recover the accuracy with ``train/distill.py``
(``model.checkpoint=OUT/checkpoint``). Exit codes: 0 done; 2 bad input (checkpoint, config, a step that cannot apply).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="slimforge checkpoint directory to compress")
    p.add_argument("--config", required=True, help="YAML with the compress steps (see configs/compress/)")
    p.add_argument("--out", required=True, help="output folder: checkpoint/ and compress_report.json")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rounds=3")
    p.add_argument(
        "--allow-factory",
        action="store_true",
        help="compress a checkpoint of a user factory (source: factory): rebuilding it imports and runs its code",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from slimforge.export.oneshot import OneShotConfig, compress_checkpoint, report_table
    from slimforge.export.report import configure_logging
    from slimforge.train.config import load_config
    from slimforge.train.errors import SlimforgeError, report_error

    configure_logging()
    try:
        cfg = load_config(OneShotConfig, args.config, args.overrides)
        report = compress_checkpoint(args.checkpoint, cfg, args.out, allow_factory=args.allow_factory)
    except SlimforgeError as e:
        return report_error(e)
    print(f"{' -> '.join(report['recipe'])}: {args.out}/checkpoint")
    print(report_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
