"""Benchmark student artifacts on every runtime against their FP32 teacher: accuracy, latency, memory, peak.

    python export/benchmark.py --teacher runs/teacher/checkpoint \\
        --student runs/student/checkpoint runs/student/export/model.onnx runs/student/export/model.ts --out runs/bench
    python export/benchmark.py --teacher CKPT --student OUT/model.onnx --runtimes ort-cpu openvino --runs 500
    python export/benchmark.py --teacher CKPT --student OUT/model.onnx@ort-cuda --batch-sizes 1 8 32 --runtimes all

A student is a checkpoint directory, an ``.onnx`` or a ``.pt``/``.ts`` file; it is run on every selected runtime
registered for its kind (``--runtimes default``: all but the opt-in ones, e.g. torch-compile), or only on RUNTIME
when written ``PATH@RUNTIME``. Runtimes this machine lacks are listed as skipped with the reason; a student that
fails gets an error row. Writes ``benchmark.json``, ``.csv``, ``.md`` and a self-contained ``benchmark.html``
(Pareto plot) into ``--out`` and prints the table.
Exit codes: 0 the report completed; 2 bad input (teacher checkpoint, data, options).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from slimforge.export.benchmarking.config import SELECTIONS, BenchConfig
    from slimforge.export.report import add_input_arguments
    from slimforge.export.runtimes import available_runtimes

    d = BenchConfig()
    t = d.timing
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher checkpoint dir (FP32 eager; DIR@RUNTIME)")
    p.add_argument("--student", nargs="+", required=True, metavar="ARTIFACT", help="artifacts, PATH or PATH@RUNTIME")
    p.add_argument("--out", required=True, help="output directory for benchmark.{json,csv,md,html}")
    p.add_argument(
        "--runtimes",
        nargs="+",
        default=d.runtimes,
        choices=[*SELECTIONS, *available_runtimes()],
        metavar="NAME",
        help=f"runtimes for artifacts that name none: default, all, or names from {', '.join(available_runtimes())}",
    )
    p.add_argument("--batch-sizes", nargs="+", type=int, default=t.batch_sizes, help="throughput sweep %(default)s")
    p.add_argument("--runs", type=int, default=t.runs, help="timed batch-1 runs, at least (%(default)s)")
    p.add_argument("--rounds", type=int, default=t.rounds, help="rounds of the batch-1 series (%(default)s)")
    p.add_argument(
        "--min-round-s",
        type=float,
        default=t.min_round_s,
        help="seconds each round and each swept batch size lasts at least (%(default)s)",
    )
    p.add_argument(
        "--unstable-spread",
        type=float,
        default=t.unstable_spread,
        help="flag rows whose round medians differ by more than this fraction of the p50 (%(default)s)",
    )
    p.add_argument("--warmup", type=int, default=t.warmup, help="untimed runs before each series (%(default)s)")
    p.add_argument("--throughput-runs", type=int, default=t.throughput_runs, help="timed runs per batch size")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads of every runtime (all cores)")
    p.add_argument("--max-images", type=int, default=d.max_images, help="validation images (%(default)s)")
    p.add_argument(
        "--accuracy-budget",
        type=float,
        default=d.accuracy_budget,
        help="recommend the fastest row at most this far below the teacher's accuracy (%(default)s = 1 point)",
    )
    p.add_argument("--peak-seconds", type=float, default=d.peak_seconds, help="per matmul-peak kernel; 0 skips it")
    p.add_argument("--row-timeout", type=float, default=d.row_timeout, help="seconds per row (%(default)s)")
    p.add_argument("--no-isolate", action="store_true", help="measure every row in this process (faster, rougher mem)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--note", default="", help="text shown at the top of the report")
    add_input_arguments(p, "benchmark", "override the teacher's recorded DataConfig")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from slimforge.export.benchmarking import BenchConfig, run_benchmark, write_benchmark
    from slimforge.export.measure import TimingConfig
    from slimforge.export.report import configure_logging, markdown_table
    from slimforge.train.errors import SlimforgeError, check_writable, report_error

    configure_logging(args.verbose)
    timing = TimingConfig(
        batch_sizes=args.batch_sizes,
        runs=args.runs,
        rounds=args.rounds,
        min_round_s=args.min_round_s,
        unstable_spread=args.unstable_spread,
        warmup=args.warmup,
        throughput_runs=args.throughput_runs,
        threads=args.threads,
    )
    cfg = BenchConfig(
        timing=timing,
        max_images=args.max_images,
        data_overrides=args.data,
        runtimes=args.runtimes,
        accuracy_budget=args.accuracy_budget,
        isolate=not args.no_isolate,
        row_timeout=args.row_timeout,
        peak_seconds=args.peak_seconds,
        progress=not args.no_progress,
        note=args.note,
        allow_factory=args.allow_factory,
    )
    try:
        check_writable(args.out, "output folder")  # before any row is measured, not after
        report = run_benchmark(args.teacher, args.student, cfg)
        paths = write_benchmark(report, args.out)
    except SlimforgeError as e:
        return report_error(e)
    print(markdown_table(report))
    print(f"report ({report['wall_seconds']} s): " + " ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
