"""Export a slimforge checkpoint to ONNX, TorchScript and int8 ONNX, each verified against PyTorch on validation images.

    python export/export.py --checkpoint runs/student/checkpoint --out runs/student/export
    python export/export.py --checkpoint CKPT --out OUT --formats onnx --opset 18 --max-images 256 --rtol 1e-4
    python export/export.py --checkpoint CKPT --out OUT --formats onnx onnx-int8 --calibration-images 256

Writes ``model.onnx`` / ``model.ts`` / ``model.int8.onnx`` (only once they pass parity; a failing one is kept as
``*.failed``; int8 is judged on top-1 agreement only, ``--int8-min-agreement``),
``model.json`` (the checkpoint's model description) and ``export_report.json`` into ``--out``.
Exit codes: 0 every artifact passed; 1 an artifact failed export or parity; 2 bad input (checkpoint, data, options).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from slimforge.export.artifacts import ExportConfig, available_formats

    d = ExportConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="slimforge checkpoint directory (model.safetensors + json)")
    p.add_argument("--out", required=True, help="output directory for artifacts and export_report.json")
    p.add_argument("--formats", nargs="+", default=d.formats, choices=available_formats(), help="%(default)s")
    p.add_argument("--opset", type=int, default=d.opset, help="ONNX opset, >= 17 (default %(default)s)")
    p.add_argument("--no-freeze", action="store_true", help="save the traced TorchScript without torch.jit.freeze")
    p.add_argument("--max-images", type=int, default=d.max_images, help="validation images checked (%(default)s)")
    p.add_argument("--rtol", type=float, default=d.parity.rtol, help="max |diff| / max |logit| (%(default)s)")
    p.add_argument(
        "--min-agreement", type=float, default=d.parity.min_agreement, help="min top-1 agreement (%(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=d.parity.batch_size, help="parity batch size (%(default)s)")
    p.add_argument(
        "--calibration-images", type=int, default=d.calibration_images, help="onnx-int8: training images (%(default)s)"
    )
    p.add_argument(
        "--int8-activations", default=d.int8_activations, choices=["uint8", "int8"], help="onnx-int8 (%(default)s)"
    )
    p.add_argument(
        "--int8-min-agreement",
        type=float,
        default=d.int8_parity.min_agreement,
        help="onnx-int8: min top-1 agreement with the FP32 model; logits are not compared (%(default)s)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the checking runtimes (all cores)")
    p.add_argument(
        "--data", nargs="*", default=[], metavar="KEY=VALUE", help="override the checkpoint's DataConfig fields"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (full export tracebacks)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from slimforge.export.artifacts import REPORT, ExportConfig, export_checkpoint, failure_message
    from slimforge.export.report import configure_logging
    from slimforge.export.verify import ParityConfig
    from slimforge.train.errors import SlimforgeError, report_error

    configure_logging(args.verbose)
    cfg = ExportConfig(
        formats=args.formats,
        opset=args.opset,
        freeze=not args.no_freeze,
        max_images=args.max_images,
        data_overrides=args.data,
        threads=args.threads,
        parity=ParityConfig(rtol=args.rtol, min_agreement=args.min_agreement, batch_size=args.batch_size),
        calibration_images=args.calibration_images,
        int8_activations=args.int8_activations,
        int8_parity=ParityConfig(rtol=None, min_agreement=args.int8_min_agreement, batch_size=args.batch_size),
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
        p = a["parity"]
        print(
            f"{os.path.join(args.out, a['file'])} [{a['precision']}]: parity ok (rel diff {p['rel_diff']:.2e}, "
            f"top-1 agreement {p['top1_agreement']:.4f} on {p['num_images']} images)"
        )
    print(f"report: {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
