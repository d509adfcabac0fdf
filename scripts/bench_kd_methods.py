"""Student alone vs logit KD vs DKD vs FitNets hints on the embedded MNIST-5k, same budget, several seeds.

    .venv/bin/python scripts/bench_kd_methods.py --teacher runs/mnist/teacher/checkpoint --epochs 2 --seeds 0 1 2

Each run is a real `accelerate launch` (configs/accelerate/ddp.yaml, 2 processes) of the demo's distillation config
(configs/distill/mnist_resnet18_to_resnet10t.yaml: the resnet18 teacher into a resnet10t student) with only the
task, the seed and the epoch budget changed; "student alone" is train/train.py on the same config. Prints one
Markdown table: validation accuracy (1,000 digits) per method, mean and sample standard deviation over the seeds,
and each run's figure; exit 1 if a run failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = "configs/distill/mnist_resnet18_to_resnet10t.yaml"
HINT = "{student: layer3, teacher: layer3, weight: 1.0}"  # both ResNets' third stage: 256 channels
METHODS = {
    "student alone (CE)": ("train", []),
    "logit KD": ("distill", ["loss.task=kd"]),
    "DKD": ("distill", ["loss.task=dkd", "loss.dkd_alpha=1.0", "loss.dkd_beta=8.0"]),
    "FitNets hint + KD": (
        "distill",
        ["loss.task=hint", "loss.hints=[{student: layer3, teacher: layer3, weight: 1.0}]"],
    ),
}


def run(entry: str, overrides: list[str], out: Path) -> float:
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "configs/accelerate/ddp.yaml", f"train/{entry}.py"]
    cmd += ["--config", CONFIG, f"train.output_dir={out}", "train.tensorboard=false", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-1500:])
    return json.loads((out / "summary.json").read_text())["val_acc"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="runs/mnist/teacher/checkpoint", help="teacher checkpoint (%(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run, every method (%(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = p.parse_args(argv)
    results: dict[str, list[float]] = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method in args.methods:
                entry, overrides = METHODS[method]
                common = [f"teacher.checkpoint={args.teacher}", f"train.seed={seed}", f"train.epochs={args.epochs}"]
                out = Path(tmp) / f"{method.split()[0]}-{seed}"
                try:
                    acc = run(entry, [*common, *overrides], out)
                except RuntimeError as e:
                    print(f"error: {method}, seed {seed}: {e}", file=sys.stderr)
                    return 1
                results[method].append(acc)
                print(f"[bench] {method}, seed {seed}: val acc {acc:.4f}", file=sys.stderr, flush=True)
    print(f"\n{args.epochs} epochs each, seeds {args.seeds}, teacher {args.teacher}\n")
    print("| method | mean val acc | std (seeds) | runs |\n|---|---|---|---|")
    for method, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {method} | {statistics.mean(accs):.4f} | {std:.4f} | {', '.join(f'{a:.4f}' for a in accs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
