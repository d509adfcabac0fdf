"""Int8 speed on this CPU: QAT-exported QDQ vs FP32 ONNX vs ONNX Runtime's own quantize_static, side by side.

    .venv/bin/python scripts/bench_int8.py    # resnet18, resnet50, mobilenetv3_large_100, efficientnet_b0
    .venv/bin/python scripts/bench_int8.py --models resnet18 --rounds 3 --runs 50

For each timm model at 224×224 (random init with batch-norm statistics from synthetic images: no download), it
goes through slimforge's own commands: a float checkpoint; ``train/train.py`` with a ``qat`` recipe step for a few
updates on synthetic images (the engine's QAT path, converted and saved); ``export/export.py`` of the QAT
checkpoint (``onnx-qdq``: the learned scales) and of the float one (``onnx`` and ``onnx-int8-ort``, ORT's
``quantize_static``, per channel, MinMax). Then the three ONNX files are timed at batch 1 in ONNX Runtime (CPU)
in interleaved rounds, each round the median of ``--runs`` calls, and the script prints, per model, the median
over rounds, the QAT/FP32 speedup, QAT vs quantize_static, and the share of MACs ORT ran in integer kernels.

Random weights make accuracy meaningless here (the accuracy figures come from the embedded-dataset runs in
docs/quantization.md); the export's agreement checks are therefore relaxed (their measured values are printed),
the int8 MAC gate is not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["resnet18", "resnet50", "mobilenetv3_large_100", "efficientnet_b0"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--out", default="runs/bench_int8")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (%(default)s)")
    p.add_argument("--runs", type=int, default=100, help="batch-1 calls per artifact per round (%(default)s)")
    p.add_argument("--qat-steps", type=int, default=4, help="QAT updates before export (%(default)s)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (all usable cores)")
    return p.parse_args(argv)


def run(args: list[str]) -> None:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")


def float_checkpoint(name: str, path: Path) -> None:
    import dataclasses

    import torch
    from torch import nn

    from slimforge.train.checkpoint import save_checkpoint
    from slimforge.train.data import DataConfig, describe
    from slimforge.train.models import ModelConfig, build_model

    data = DataConfig(source="synthetic", image_size=224, in_chans=3, synthetic_samples=256, synthetic_classes=10)
    info = describe(data)
    torch.manual_seed(0)
    model, spec = build_model(ModelConfig(name=name), 10, info["input_size"], info)
    # timm zero-initialises the last batch-norm scale of every residual block; give batch norm non-trivial scales
    # and statistics from images, so activations and their int8 ranges look like a trained network's.
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) * 0.8 + 0.4
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 224, 224, generator=g))
    save_checkpoint(model.eval().state_dict(), spec, path, extra={"data": dataclasses.asdict(data)})


def artifacts(name: str, out: Path, qat_steps: int) -> dict[str, Path]:
    py = sys.executable
    fp32 = out / "fp32"
    if not (fp32 / "slimforge.json").exists():
        float_checkpoint(name, fp32)
    qat = out / "qat"
    if not (qat / "checkpoint" / "slimforge.json").exists():
        steps = "compress=[{method: qat, calibration_images: 64, freeze_observers_step: 2, freeze_bn_step: 2}]"
        run([py, "train/train.py", "--config", "configs/debug/tiny_train.yaml", f"model.checkpoint={fp32}",
             "model.name=null", "data.source=synthetic", "data.image_size=224", "data.in_chans=3",
             "data.synthetic_samples=256", "data.synthetic_classes=10", "data.batch_size=8", "data.augment=false",
             "data.max_train_samples=null", "data.max_val_samples=32", "optim.lr=0.00001", "train.epochs=1",
             f"train.max_steps={qat_steps}", "train.tensorboard=false", "train.overwrite=true",
             f"train.output_dir={qat}", steps])  # fmt: skip
    relaxed = ["--max-images", "32", "--calibration-images", "64", "--emulated-rtol", "1",
               "--int8-min-agreement", "0", "--float-min-agreement", "0"]  # fmt: skip
    run([py, "export/export.py", "--checkpoint", str(qat / "checkpoint"), "--out", str(out / "qat_export"),
         "--formats", "onnx-qdq", *relaxed])  # fmt: skip
    run([py, "export/export.py", "--checkpoint", str(fp32), "--out", str(out / "fp32_export"), "--formats", "onnx",
         "onnx-int8-ort", *relaxed])  # fmt: skip
    return {
        "fp32": out / "fp32_export" / "model.onnx",
        "qat-int8": out / "qat_export" / "model.int8.onnx",
        "ort-static-int8": out / "fp32_export" / "model.ort-int8.onnx",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from slimforge.export.machine import default_threads, machine_fingerprint
    from slimforge.export.oneshot import interleaved_latency

    threads = args.threads or default_threads()
    machine = machine_fingerprint(threads=threads)
    print(
        f"{machine['cpu']}, {threads} threads, features {machine['cpu_features']}, onnxruntime {machine['onnxruntime']}"
    )
    results = []
    for name in args.models:
        out = ROOT / args.out / name
        started = time.perf_counter()
        files = artifacts(name, out, args.qat_steps)
        report = json.loads((out / "qat_export" / "export_report.json").read_text())["artifacts"][0]
        ort_report = json.loads((out / "fp32_export" / "export_report.json").read_text())["artifacts"][1]
        ms = interleaved_latency(files, (3, 224, 224), args.rounds, args.runs, threads)
        row = {
            "model": name,
            **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
            "qat_speedup_vs_fp32": round(ms["fp32"] / ms["qat-int8"], 2),
            "qat_vs_ort_static": round(ms["qat-int8"] / ms["ort-static-int8"], 3),
            "qat_int8_mac_fraction": report.get("int8_mac_fraction"),
            "ort_static_int8_mac_fraction": ort_report.get("int8_mac_fraction"),
            "qat_int8_ops": (report.get("int8_macs") or {}).get("ops"),
            "emulated_rel_diff_max": report["checks"]["emulated"]["rel_diff"],
            "emulated_rel_diff_median": report["checks"]["emulated"]["rel_diff_at_quantile"],
            "deployed_top1_agreement": report["checks"]["deployed"]["top1_agreement"],
            "seconds": round(time.perf_counter() - started, 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    header = "| model | FP32 ms | QAT int8 ms | ORT quantize_static ms | QAT speedup | QAT / static | int8 MACs (QAT) |"
    print("\n" + header + "\n|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['fp32_ms']:.2f} | {r['qat-int8_ms']:.2f} | {r['ort-static-int8_ms']:.2f} | "
            f"{r['qat_speedup_vs_fp32']:.2f}× | {r['qat_vs_ort_static']:.3f} | {r['qat_int8_mac_fraction']:.1%} |"
        )
    (ROOT / args.out / "bench_int8.json").write_text(json.dumps({"machine": machine, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
