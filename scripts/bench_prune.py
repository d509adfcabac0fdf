"""Structured pruning at ImageNet size: timm models at 224×224 pruned to a share of their MACs with
``compress/compress.py``, then MACs, parameters, size and ONNX Runtime FP32 latency at batch 1, before and after,
measured side by side in one run (interleaved rounds).

    .venv/bin/python scripts/bench_prune.py                        # resnet50 to 50% of its MACs
    .venv/bin/python scripts/bench_prune.py --models resnet50 mobilenetv3_large_100 --macs 0.5 --rounds 7

Random weights (batch-norm statistics from synthetic images, as in scripts/bench_int8.py): no download, and
accuracy is not the point here; the MACs and the latency do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_int8 import float_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50"])
    p.add_argument("--macs", type=float, default=0.5, help="share of MACs kept (%(default)s)")
    p.add_argument("--importance", default="l2", choices=["l2", "l1", "bn_scale"])
    p.add_argument("--round-to", type=int, default=8, help="channel counts a multiple of this; 0: any (%(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds (%(default)s)")
    p.add_argument("--runs", type=int, default=30, help="batch-1 calls per model per round (%(default)s)")
    p.add_argument("--out", default="runs/bench_prune")
    args = p.parse_args(argv)
    out = ROOT / args.out
    for name in args.models:
        float_checkpoint(name, out / name / "float")
        config = out / name / "prune.yaml"
        step = {"method": "prune", "macs": args.macs, "importance": args.importance, "round_to": args.round_to or None}
        config.write_text(json.dumps({"compress": [step], "calibration_images": 16, "rounds": args.rounds,
                                      "runs": args.runs}))  # fmt: skip
        cmd = [sys.executable, "compress/compress.py", "--checkpoint", str(out / name / "float"), "--config",
               str(config), "--out", str(out / name / "pruned")]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name}: {proc.stderr[-3000:]}")
        report = json.loads((out / name / "pruned" / "compress_report.json").read_text())
        r = report["ratios"]
        rounding = f", channels multiple of {args.round_to}" if args.round_to else ""
        print(f"\n{name} @224, target {args.macs:.0%} of the MACs ({args.importance}{rounding}):")
        print(proc.stdout.strip().split("\n", 1)[1])
        print(f"MACs {r['macs']:.3f} of the original ({abs(r['macs'] - args.macs) / args.macs:.1%} from the target); "
              f"ORT latency {r['ort_ms']:.3f} of the original: speed-up {1 / r['ort_ms']:.2f}x for a "
              f"{1 / r['macs']:.2f}x MAC reduction")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
