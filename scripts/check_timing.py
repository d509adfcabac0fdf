"""Cross-check the benchmark's batch-1 median against independent timing loops, side by side in one run.

    .venv/bin/python scripts/check_timing.py --checkpoint runs/mnist/student/checkpoint \\
        --onnx runs/mnist/export/model.onnx

Runs the benchmark (default timing: each row in its own process, at least 200 batch-1 calls in 5 rounds of at
least 0.4 s) on the checkpoint in PyTorch eager and its ONNX export in ONNX Runtime, ``--repeats`` times in a
row, and around each benchmark times the same two models without any slimforge timing code:
``torch.utils.benchmark.Timer`` for eager and a bare ``session.run`` loop for ONNX Runtime (as many calls as the
benchmark's rows, for as long: at least ``--loop-seconds``), each in a fresh process of its own as the
benchmark's rows are: the eager loop just before the benchmark (whose first row is eager), the ORT loop just
after it (its last row is ORT), because this VM drifts between speed states over seconds. Every repeat compares
the benchmark's p50 with the loop next to it and prints the
spread the benchmark reported for that row (how much the machine moved while it was measured). A control loop
(a second bare ORT loop, right after the first) says how far two identical independent measurements land apart on
this machine at that moment: where they differ by more than the tolerance, no timing method can be held to it.
Exit 0 when every repeat of every runtime is within ``--tolerance`` (10%), 1 otherwise.

``--drift 300`` times only the bare ORT loop, for 300 s, and prints how often two identical windows a second
apart differ by more than the tolerance: how far this machine moves on its own, whatever is being timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="slimforge checkpoint (timed in eager PyTorch)")
    p.add_argument("--onnx", required=True, help="an .onnx exported by export/export.py (timed in ONNX Runtime)")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 runs, both sides (%(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, both sides (all usable cores)")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed |ratio - 1| (%(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="benchmark runs, each followed by the independent loops")
    p.add_argument("--loop-seconds", type=float, default=2.0, help="minimum duration of an independent loop, as "
                   "the benchmark's default rows (5 rounds of at least 0.4 s)")  # fmt: skip
    p.add_argument("--drift", type=float, metavar="SECONDS", help="only measure how far this machine drifts: one "
                   "bare ORT loop this long, and how often two windows 1 s apart differ by the tolerance")  # fmt: skip
    p.add_argument("--no-control", dest="control", action="store_false", help="skip the control loop")
    p.add_argument("--loop", choices=["torch-eager", "ort-cpu"], help=argparse.SUPPRESS)  # one independent loop
    p.add_argument("--image", help=argparse.SUPPRESS)  # the loop's input, a .npy the parent wrote
    args = p.parse_args(argv)
    if args.drift is not None and args.drift < 10:
        p.error(f"--drift {args.drift:g}: give at least 10 seconds (two 5-s stretches); 300 shows minutes of drift")
    return args


def independent_ms(args: argparse.Namespace, loop: str, threads: int) -> float:
    """Runs one independent loop in a fresh interpreter (this script with ``--loop``) and returns its median."""
    import subprocess

    cmd = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--onnx", args.onnx, "--loop", loop]
    cmd += ["--image", args.image]
    cmd += ["--runs", str(args.runs), "--threads", str(threads), "--loop-seconds", str(args.loop_seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def first_image(checkpoint: str):
    """The first validation image of the checkpoint's dataset, preprocessed for its model: ``[1, C, H, W]``."""
    from slimforge.export.evaldata import ValidationSet, data_config_from_meta
    from slimforge.train.checkpoint import read_meta
    from slimforge.train.models import ModelSpec

    meta = read_meta(checkpoint)
    return ValidationSet(data_config_from_meta(meta), 1).images_for(ModelSpec.from_dict(meta["model"]))[:1]


def eager_median_ms(checkpoint: str, image, threads: int, runs: int, seconds: float) -> float:
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
    return timer.blocked_autorange(min_run_time=max(runs * once, seconds)).median * 1e3


def ort_calls(onnx_path: str, image, threads: int, runs: int, seconds: float) -> tuple[list[float], list[float]]:
    """A bare ``session.run`` loop of at least ``runs`` single-image calls lasting ``seconds``: each call's start
    (seconds from the first) and duration (ms).

    Only NumPy and ONNX Runtime are imported (0.15 s instead of 2 s with PyTorch and slimforge), so the loop starts
    within about a second of the benchmark's last row; its session options are set here, as the benchmark sets them.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: image}
    for _ in range(10):
        sess.run(None, feed)
    starts, ms = [], []
    begin = time.perf_counter()
    while len(ms) < runs or time.perf_counter() - begin < seconds:
        start = time.perf_counter()
        sess.run(None, feed)
        ms.append((time.perf_counter() - start) * 1e3)
        starts.append(start - begin)
    return starts, ms


def drift(args: argparse.Namespace, image, threads: int) -> None:
    """``--drift``: how far this machine moves on its own. One bare ORT loop for ``--drift`` seconds; prints the
    medians of its 5-s stretches and, over every pair of ``--loop-seconds`` windows 1 s apart (a row, then the loop
    that checks it) and of windows 4 times as long, the share of pairs whose medians differ by more than
    ``--tolerance``."""
    import numpy as np

    starts, ms = map(np.asarray, ort_calls(args.onnx, image, threads, 1, args.drift))
    med = lambda a, b: float(np.median(ms[(starts >= a) & (starts < b)]))  # noqa: E731
    five = [med(t, t + 5) for t in range(0, int(args.drift) - 4, 5)]
    print(f"bare ORT loop, {len(ms)} calls over {args.drift:.0f} s; medians of 5-s stretches (ms): "
          + " ".join(f"{m:.3f}" for m in five))  # fmt: skip
    print(f"slowest / fastest stretch: {max(five) / min(five):.3f}")
    for w in (args.loop_seconds, 4 * args.loop_seconds):  # the rows' length, and rows 4 times longer
        pairs = [med(t, t + w) / med(t + w + 1, t + 2 * w + 1) for t in np.arange(0, args.drift - 2 * w - 1, 0.5)]
        if not pairs:
            continue
        off = float(np.mean([abs(r - 1) > args.tolerance for r in pairs]))
        print(f"{len(pairs)} pairs of {w:g}-s windows 1 s apart: {off:.0%} differ by more than {args.tolerance:.0%} "
              f"(largest {max(abs(r - 1) for r in pairs):.0%}); at this drift {args.repeats} repeats in a row all "
              f"hold {args.tolerance:.0%} with probability about {(1 - off) ** args.repeats:.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np

    if args.loop == "ort-cpu":
        _, ms = ort_calls(args.onnx, np.load(args.image), args.threads, args.runs, args.loop_seconds)
        print(statistics.median(ms))
        return 0
    import torch

    from slimforge.export.benchmarking import BenchConfig, run_benchmark
    from slimforge.export.machine import default_threads, load_average
    from slimforge.export.measure import TimingConfig
    from slimforge.export.report import configure_logging

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    if args.loop:
        # The image comes from a file, as in the benchmark's workers: no dataset code runs in the timed process.
        image = torch.from_numpy(np.load(args.image))
        print(eager_median_ms(args.checkpoint, image, threads, args.runs, args.loop_seconds))
        return 0
    if args.drift:
        drift(args, np.ascontiguousarray(first_image(args.checkpoint).numpy()), threads)
        return 0
    configure_logging()
    tmp = tempfile.TemporaryDirectory(prefix="check-timing-")
    args.image = os.path.join(tmp.name, "image.npy")
    np.save(args.image, first_image(args.checkpoint).numpy())
    print(f"threads {threads}, {args.runs} runs, load average {load_average()} at start", flush=True)

    timing = TimingConfig(runs=args.runs, batch_sizes=[1], threads=threads)  # the benchmark's default rounds
    cfg = BenchConfig(timing=timing, max_images=32, peak_seconds=0, progress=False)
    tools = {"torch-eager": "torch.utils.benchmark.Timer", "ort-cpu": "bare session.run loop"}
    ok, noisy = True, 0
    control = " control loop ms | loop ÷ control |" if args.control else ""
    print(f"\n| repeat | runtime | benchmark p50 ms | benchmark spread | independent ms | ratio | within "
          f"{args.tolerance:.0%} |{control}\n|---|---|---|---|---|---|---|{'---|---|' if control else ''}",
          flush=True)  # fmt: skip
    for r in range(args.repeats):
        # This VM drifts between speed states over seconds: each loop runs right next to the row it checks (the
        # eager loop just before the benchmark, whose first row is eager; the ORT loop just after its last row).
        independent = {"torch-eager": independent_ms(args, "torch-eager", threads)}
        report = run_benchmark(args.checkpoint, [f"{args.onnx}@ort-cpu"], cfg)
        independent["ort-cpu"] = independent_ms(args, "ort-cpu", threads)
        again = independent_ms(args, "ort-cpu", threads) if args.control else None
        for row in report["rows"]:
            if row["status"] != "ok":
                print(f"error: {row['runtime']} row {row['status']}: {row['reason']}", file=sys.stderr)
                return 1
            lat, i = row["latency_ms"], independent[row["runtime"]]
            within = abs(lat["p50"] / i - 1) <= args.tolerance
            ok &= within
            extra = ""
            if args.control:
                extra = " | |" if row["runtime"] != "ort-cpu" else f" {again:.3f} | {i / again:.3f} |"
                noisy += row["runtime"] == "ort-cpu" and abs(i / again - 1) > args.tolerance
            print(f"| {r + 1} | {row['runtime']} | {lat['p50']:.3f} | {lat['spread']:.1%}"
                  f"{'' if lat['stable'] else ' (unstable)'} | {i:.3f} ({tools[row['runtime']]}) | "
                  f"{lat['p50'] / i:.3f} | {'yes' if within else 'NO'} |{extra}", flush=True)  # fmt: skip
    print(f"\nload average {load_average()} at the end; models: {os.path.basename(args.checkpoint)}, {args.onnx}")
    if noisy:
        print(f"two identical bare ORT loops, one right after the other, differed by more than {args.tolerance:.0%} "
              f"in {noisy} of {args.repeats} repeats: this machine moved more than the tolerance between "
              "measurements")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
