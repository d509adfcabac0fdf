"""Cross-check the benchmark's batch-1 median against independent timing loops, side by side in one run.

    .venv/bin/python scripts/check_timing.py --checkpoint runs/mnist/student/checkpoint \\
        --onnx runs/mnist/export/model.onnx

Runs the benchmark (default settings: each row in its own process, 200 timed runs) on the checkpoint in PyTorch
eager and its ONNX export in ONNX Runtime, and times the same two models without any slimforge timing code:
``torch.utils.benchmark.Timer`` for eager and a bare ``session.run`` loop for ONNX Runtime, each in a fresh
process of its own as the benchmark's rows are. The two alternate for ``--rounds`` rounds so that drift in the
machine's speed (on this shared VM the same ORT loop moves between ~0.25 and ~0.33 ms for minutes at a time)
hits both sides alike; the medians over rounds are compared. Prints every number and the ratios; exit 0 when
every ratio is within ``--tolerance`` (10%), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="slimforge checkpoint (timed in eager PyTorch)")
    p.add_argument("--onnx", required=True, help="an .onnx exported by export/export.py (timed in ONNX Runtime)")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 runs, both sides (%(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, both sides (all usable cores)")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed |ratio - 1| (%(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="alternations of independent loops and benchmark")
    p.add_argument("--loop", choices=["torch-eager", "ort-cpu"], help=argparse.SUPPRESS)  # one independent loop
    return p.parse_args(argv)


def independent_ms(args: argparse.Namespace, loop: str, threads: int) -> float:
    """Runs one independent loop in a fresh interpreter (this script with ``--loop``) and returns its median."""
    import subprocess

    cmd = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--onnx", args.onnx, "--loop", loop]
    cmd += ["--runs", str(args.runs), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def first_image(checkpoint: str):
    """The first validation image of the checkpoint's dataset, preprocessed for its model: ``[1, C, H, W]``."""
    from slimforge.export.evaldata import ValidationSet, data_config_from_meta
    from slimforge.train.checkpoint import read_meta
    from slimforge.train.models import ModelSpec

    meta = read_meta(checkpoint)
    return ValidationSet(data_config_from_meta(meta), 1).images_for(ModelSpec.from_dict(meta["model"]))[:1]


def eager_median_ms(checkpoint: str, image, threads: int, runs: int) -> float:
    """``torch.utils.benchmark.Timer``: its median over blocks of calls, in ms."""
    import torch
    import torch.utils.benchmark as tb

    from slimforge.train.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(checkpoint)
    with torch.inference_mode():
        for _ in range(10):
            model(image)
    timer = tb.Timer("with torch.inference_mode(): model(x)", globals={"torch": torch, "model": model, "x": image},
                     num_threads=threads)  # fmt: skip
    once = timer.timeit(3).mean
    # About `runs` calls in total, in blocks, as Timer's own autorange does.
    return timer.blocked_autorange(min_run_time=max(runs * once, 1.0)).median * 1e3


def ort_median_ms(onnx_path: str, image, threads: int, runs: int) -> float:
    """A bare ``session.run`` loop: the median of ``runs`` single-image calls, in ms."""
    import onnxruntime as ort

    from slimforge.export.runtimes.ort import session_options

    sess = ort.InferenceSession(onnx_path, session_options(threads), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: image}
    for _ in range(10):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from slimforge.export.benchmarking import BenchConfig, run_benchmark
    from slimforge.export.machine import default_threads
    from slimforge.export.measure import TimingConfig
    from slimforge.export.report import configure_logging, load_average

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    if args.loop:
        image = first_image(args.checkpoint)
        if args.loop == "torch-eager":
            print(eager_median_ms(args.checkpoint, image, threads, args.runs))
        else:
            print(ort_median_ms(args.onnx, np.ascontiguousarray(image.numpy()), threads, args.runs))
        return 0
    configure_logging()
    print(f"threads {threads}, {args.runs} runs, load average {load_average()} at start", flush=True)

    timing = TimingConfig(runs=args.runs, batch_sizes=[1], threads=threads)
    cfg = BenchConfig(timing=timing, max_images=32, peak_seconds=0, progress=False)
    independent: dict[str, list[float]] = {"torch-eager": [], "ort-cpu": []}
    bench: dict[str, list[float]] = {"torch-eager": [], "ort-cpu": []}
    for r in range(args.rounds):
        for loop in independent:
            independent[loop].append(independent_ms(args, loop, threads))
        report = run_benchmark(args.checkpoint, [f"{args.onnx}@ort-cpu"], cfg)
        for row in report["rows"]:
            if row["status"] != "ok":
                print(f"error: {row['runtime']} row {row['status']}: {row['reason']}", file=sys.stderr)
                return 1
            bench[row["runtime"]].append(row["latency_ms"]["p50"])
        print(f"round {r + 1}: " + ", ".join(
            f"{k} benchmark {bench[k][-1]:.3f} ms / independent {independent[k][-1]:.3f} ms" for k in bench
        ), flush=True)  # fmt: skip

    ok = True
    header = "| runtime | benchmark p50 ms (median of rounds) | independent median ms (median of rounds) | ratio |"
    print(f"\n{header} within {args.tolerance:.0%} |")
    print("|---|---|---|---|---|")
    for name, tool in (("torch-eager", "torch.utils.benchmark.Timer"), ("ort-cpu", "bare session.run loop")):
        b, i = statistics.median(bench[name]), statistics.median(independent[name])
        within = abs(b / i - 1) <= args.tolerance
        ok &= within
        print(f"| {name} | {b:.3f} | {i:.3f} ({tool}) | {b / i:.3f} | {'yes' if within else 'NO'} |")
    print(f"\nload average {load_average()} at the end; models: {os.path.basename(args.checkpoint)}, {args.onnx}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
