"""Compression of modern timm recipes (dropout, drop-path, layer scale): QAT, pruning and low-rank, end to end.

    .venv/bin/python scripts/sweep_regularised.py                          # the three models below, ~25 min on 2 cores
    .venv/bin/python scripts/sweep_regularised.py --models convnext_atto --steps 20

Each model is built by timm with its regularisers on (``pretrained=False``), trained briefly in FP32 on the
embedded MNIST-5k at 32×32, then taken through slimforge's own commands:

* ``train/train.py`` with a ``qat`` step (drop-path and dropout live while it trains), then two evaluations of the
  QAT checkpoint (two fresh loads, the same validation images) that must be bit-identical, then
  ``export/export.py --formats onnx-qdq`` with its default gates (emulated, deployed, int8 MACs);
* ``train/train.py`` with a ``prune`` step and with a ``lowrank`` step, each checkpoint exported as float ONNX with
  the default parity gate (the pruned / factorised architecture is rebuilt from the checkpoint alone).

It prints one JSON row per model and a table; nothing is asserted here that the export's gates do not assert.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "convnext_atto": "{drop_path_rate: 0.1}",
    "efficientnet_b0": "{drop_path_rate: 0.2, drop_rate: 0.2}",
    "resnet50": "{drop_path_rate: 0.05}",
}
STEPS = {
    "qat": "[{method: qat, calibration_images: 128, freeze_observers_step: %d, freeze_bn_step: %d}]",
    "prune": "[{method: prune, macs: 0.5, global_ranking: true}]",
    "lowrank": "[{method: lowrank, energy: 0.9}]",
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", default="runs/sweep_regularised")
    p.add_argument("--steps", type=int, default=40, help="optimizer updates of every training run (%(default)s)")
    p.add_argument("--train-samples", type=int, default=1024, help="training images (%(default)s)")
    p.add_argument("--val-images", type=int, default=500, help="images of every check (%(default)s)")
    return p.parse_args(argv)


def run(args: list[str]) -> None:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")


def train(out: Path, model: list[str], args: argparse.Namespace, compress: str = "[]") -> Path:
    if not (out / "checkpoint" / "slimforge.json").exists():
        run([sys.executable, "train/train.py", "--config", "configs/debug/tiny_train.yaml", *model,
             "data.image_size=32", f"data.max_train_samples={args.train_samples}",
             f"data.max_val_samples={args.val_images}", "train.epochs=100", f"train.max_steps={args.steps}",
             "train.tensorboard=false", "train.overwrite=true",
             f"train.output_dir={out}", f"compress={compress}"])  # fmt: skip
    return out / "checkpoint"


def export(checkpoint: Path, out: Path, formats: list[str], images: int) -> dict:
    run([sys.executable, "export/export.py", "--checkpoint", str(checkpoint), "--out", str(out), "--formats",
         *formats, "--max-images", str(images)])  # fmt: skip
    return json.loads((out / "export_report.json").read_text())


def evaluations_identical(checkpoint: Path, images: int) -> tuple[bool, float]:
    """Two fresh loads of one checkpoint, evaluated on the same validation images: bit-identical logits?"""
    import torch

    from slimforge.export.evaldata import ValidationSet, data_config_from_meta
    from slimforge.train.checkpoint import load_checkpoint

    logits, accuracy = [], 0.0
    for _ in range(2):
        model, spec, meta = load_checkpoint(checkpoint)
        val = ValidationSet(data_config_from_meta(meta), images)
        with torch.no_grad():
            out = torch.cat([model(x) for x in val.images_for(spec).split(100)])
        logits.append(out)
        accuracy = float((out.argmax(1) == val.labels).float().mean())
    return torch.equal(*logits), accuracy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for name in args.models:
        started = time.perf_counter()
        out = ROOT / args.out / name
        model = [f"model.name={name}", f"model.kwargs={MODELS[name]}"]
        fp32 = train(out / "fp32", model, args)
        from_fp32 = [f"model.checkpoint={fp32}", "model.name=null"]
        half = args.steps // 2
        qat = train(out / "qat", from_fp32, args, STEPS["qat"] % (half, half))
        same, qat_accuracy = evaluations_identical(qat, args.val_images)
        int8 = export(qat, out / "qat_export", ["onnx-qdq"], args.val_images)["artifacts"][0]
        row = {
            "model": name,
            "kwargs": MODELS[name],
            "fp32_accuracy": round(evaluations_identical(fp32, args.val_images)[1], 4),
            "qat_accuracy": round(qat_accuracy, 4),
            "qat_two_evaluations_identical": same,
            "int8_passed": int8["passed"],
            "emulated_rel_diff_median": int8["checks"]["emulated"]["rel_diff_at_quantile"],
            "emulated_rel_diff_max": int8["checks"]["emulated"]["rel_diff"],
            "deployed_top1_agreement": int8["checks"]["deployed"]["top1_agreement"],
            "int8_mac_fraction": int8.get("int8_mac_fraction"),
        }
        for method in ("prune", "lowrank"):
            ckpt = train(out / method, from_fp32, args, STEPS[method])
            report = export(ckpt, out / f"{method}_export", ["onnx"], args.val_images)["artifacts"][0]
            row[f"{method}_export_passed"] = report["passed"]
            row[f"{method}_onnx_rel_diff"] = report["parity"]["rel_diff"]
            row[f"{method}_macs_kept"] = json.loads((ckpt / "slimforge.json").read_text())["model"]["recipe"][-1][
                "record"
            ].get("macs_after")
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | QAT top-1 | evals identical | emulated median / max | ORT vs fake-quant top-1 | int8 MACs | "
          "int8 gates | prune export | lowrank export |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(
            f"| {r['model']} {r['kwargs']} | {r['qat_accuracy']:.4f} | {r['qat_two_evaluations_identical']} | "
            f"{r['emulated_rel_diff_median']:.1e} / {r['emulated_rel_diff_max']:.1e} | "
            f"{r['deployed_top1_agreement']:.4f} | {r['int8_mac_fraction']:.1%} | {r['int8_passed']} | "
            f"{r['prune_export_passed']} | {r['lowrank_export_passed']} |"
        )
    (ROOT / args.out / "sweep.json").write_text(json.dumps(rows, indent=2))
    return 0 if all(r["int8_passed"] and r["qat_two_evaluations_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
