"""Export a slimforge checkpoint to ONNX / TorchScript / int8 ONNX, each verified against PyTorch on real images.

    python export/export.py --checkpoint runs/student/checkpoint --out runs/student/export
    python export/export.py --checkpoint CKPT --out OUT --formats onnx --opset 18 --max-images 256 --rtol 1e-4
    python export/export.py --checkpoint CKPT --out OUT --formats onnx onnx-int8 --calibrator entropy

Without ``--formats`` a checkpoint exports as what it is: ``model.onnx`` + ``model.ts`` for a float model,
``model.int8.onnx`` (QDQ, the learned scales) + ``model.ts`` for a quantisation-aware-trained one. A file gets its
final name only once it passes its checks (a failing one is kept as ``*.failed``); ``export_report.json`` holds
every check's numbers and, for int8 files, the share of multiply-accumulates ONNX Runtime ran in integer kernels.
Exit codes: 0 every artifact passed; 1 an artifact failed export or a check; 2 bad input (checkpoint, data, options).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from slimforge.export.artifacts import ExportConfig
    from slimforge.export.formats import available_formats
    from slimforge.export.report import add_input_arguments

    d = ExportConfig()
    q = d.int8
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="slimforge checkpoint directory (model.safetensors + json)")
    p.add_argument("--out", required=True, help="output directory for artifacts and export_report.json")
    p.add_argument("--formats", nargs="+", choices=available_formats(), help="default: what the checkpoint is")
    p.add_argument("--opset", type=int, default=d.opset, help="ONNX opset, >= 17 (default %(default)s)")
    p.add_argument("--no-freeze", action="store_true", help="save the traced TorchScript without torch.jit.freeze")
    p.add_argument("--max-images", type=int, default=d.max_images, help="validation images checked (%(default)s)")
    p.add_argument("--rtol", type=float, default=d.parity.rtol, help="max |diff| / max |logit| (%(default)s)")
    p.add_argument("--min-agreement", type=float, default=d.parity.min_agreement, help="min top-1 agreement")
    p.add_argument("--batch-size", type=int, default=d.parity.batch_size, help="check batch size (%(default)s)")
    int8 = p.add_argument_group("int8")
    int8.add_argument("--calibrator", default=q.calibrator, choices=["minmax", "percentile", "entropy"])
    int8.add_argument("--percentile", type=float, default=q.percentile, help="percentile calibrator (%(default)s)")
    int8.add_argument("--calibration-images", type=int, default=q.calibration_images, help="(%(default)s)")
    int8.add_argument("--int8-backend", default=q.backend, choices=["ort-cpu", "tensorrt"], help="(%(default)s)")
    int8.add_argument("--int8-activations", choices=["uint8", "int8"], help="default: the backend's")
    int8.add_argument(
        "--min-int8-mac-fraction",
        type=float,
        default=q.min_int8_mac_fraction,
        help="fail an int8 file that runs less of its MACs in integer kernels (%(default)s)",
    )
    int8.add_argument(
        "--emulated-rtol", type=float, default=q.emulated.rtol, help="ORT without optimisations vs fake-quant"
    )
    int8.add_argument(
        "--emulated-quantile",
        type=float,
        default=q.emulated.quantile,
        help="per-image quantile of the emulated difference held to --emulated-rtol (%(default)s: the median image)",
    )
    int8.add_argument(
        "--int8-min-agreement",
        type=float,
        default=q.deployed.min_agreement,
        help="top-1 agreement of the int8 file with the fake-quant model, emulated and deployed (%(default)s)",
    )
    int8.add_argument(
        "--float-min-agreement",
        type=float,
        default=q.versus_float.min_agreement,
        help="onnx-int8-ort / onnx-dynamic: top-1 agreement with the float model (%(default)s)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the checking runtimes (all cores)")
    add_input_arguments(p, "export", "override the checkpoint's DataConfig fields")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import dataclasses

    from slimforge.export.artifacts import REPORT, ExportConfig, Int8Config, export_checkpoint, failure_message
    from slimforge.export.report import configure_logging
    from slimforge.export.verify import ParityConfig
    from slimforge.train.errors import SlimforgeError, report_error

    configure_logging(args.verbose)
    q = Int8Config()
    int8 = dataclasses.replace(
        q,
        calibrator=args.calibrator,
        percentile=args.percentile,
        calibration_images=args.calibration_images,
        backend=args.int8_backend,
        activations=args.int8_activations,
        min_int8_mac_fraction=args.min_int8_mac_fraction,
        emulated=dataclasses.replace(
            q.emulated,
            rtol=args.emulated_rtol,
            quantile=args.emulated_quantile,
            min_agreement=args.int8_min_agreement,
            batch_size=args.batch_size,
        ),
        deployed=dataclasses.replace(q.deployed, min_agreement=args.int8_min_agreement, batch_size=args.batch_size),
        versus_float=dataclasses.replace(
            q.versus_float, min_agreement=args.float_min_agreement, batch_size=args.batch_size
        ),
    )
    cfg = ExportConfig(
        formats=args.formats,
        opset=args.opset,
        freeze=not args.no_freeze,
        max_images=args.max_images,
        data_overrides=args.data,
        threads=args.threads,
        parity=ParityConfig(rtol=args.rtol, min_agreement=args.min_agreement, batch_size=args.batch_size),
        int8=int8,
        allow_factory=args.allow_factory,
    )
    try:
        report = export_checkpoint(args.checkpoint, args.out, cfg)
    except SlimforgeError as e:
        return report_error(e)
    report_path = os.path.join(args.out, REPORT)
    if not report["passed"]:
        print(f"error: {failure_message(report)}\n  report: {report_path}", file=sys.stderr)
        return 1
    for a in report["artifacts"]:
        checks = ", ".join(
            f"{name} rel diff {c['rel_diff']:.2e}"
            + (f" (median image {c['rel_diff_at_quantile']:.1e})" if c["quantile"] < 1 else "")
            + f" top-1 {c['top1_agreement']:.4f}"
            for name, c in a["checks"].items()
        )
        mac = f", int8 MACs {a['int8_mac_fraction']:.1%}" if a.get("int8_mac_fraction") is not None else ""
        images = a["parity"]["num_images"]
        print(f"{os.path.join(args.out, a['file'])} [{a['precision']}]: ok ({checks}{mac}; {images} images)")
    print(f"report: {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
