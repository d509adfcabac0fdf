"""Search students, pruning, low-rank and precision for the fastest model within an accuracy and latency budget.

    python export/search.py --config configs/search/mnist.yaml
    python export/search.py --config configs/search/mnist.yaml trials.count=10 target.latency_ms=2

Any number of processes with the same config share one Optuna study (its journal file under ``output_dir``, or
``storage``); a rerun after a kill resumes it. See docs/search.md.
Exit codes: 0 a recommendation within both budgets; 1 no trial completed (every one failed); 2 bad input (config,
space, runtime, teacher); 3 trials completed but none meets both budgets (the report names the nearest).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="search config YAML (configs/search/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--report-only", action="store_true", help="write the report of the study as it is and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import logging

    from slimforge.export.searching.config import SearchConfig
    from slimforge.export.searching.report import REPORT, write_config, write_report
    from slimforge.export.searching.study import open_study, work
    from slimforge.train.config import load_config
    from slimforge.train.errors import SlimforgeError, check_writable, report_error

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(SearchConfig, args.config, args.overrides)
        check_writable(cfg.output_dir, "output_dir")
        write_config(cfg)
        if not args.report_only:
            work(cfg)
        report = write_report(open_study(cfg), cfg)
    except SlimforgeError as e:
        return report_error(e)
    rows = {r["number"]: r for r in report["trials"]}
    print(
        f"report: {cfg.output_dir}/{REPORT}, {cfg.output_dir}/pareto.md "
        f"(time saved by reuse {report['time_saved_s']} s)"
    )
    if report["recommended"]:
        rec = rows[report["recommended"]["trial"]]
        print(
            f"recommended: trial {rec['number']} {rec['artifact']} "
            f"({rec['latency_ms']:.3f} ms, acc {rec['accuracy']:.4f})"
        )
        return 0
    if not any(r["status"] == "complete" for r in rows.values()):
        print(
            "error: no trial completed; reasons: " + "; ".join(str(r["reason"]) for r in rows.values()), file=sys.stderr
        )
        return 1
    near = ", ".join(
        f"trial {n} ({rows[n]['latency_ms']:.3f} ms, {rows[n]['accuracy_drop']:.2f} points below the teacher)"
        for n in report["nearest"]
    )
    print(
        f"error: no trial meets both budgets ({cfg.target.latency_ms:g} ms, {cfg.target.accuracy_drop:g} points); "
        f"nearest: {near}\n  fix: loosen target.latency_ms / target.accuracy_drop or widen the space",
        file=sys.stderr,
    )
    return 3


if __name__ == "__main__":
    sys.exit(main())
