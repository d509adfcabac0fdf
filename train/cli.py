"""Shared command line of the training entries: ``--config FILE`` plus ``section.key=value`` overrides."""

from __future__ import annotations

import argparse

from slimforge.train.errors import SlimforgeError, report_error


def parse_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides: section.key=value, e.g. train.epochs=3 optim.lr=0.001 data.batch_size=32. "
        "Sections: model, teacher, data, optim, loss, train, compress (see README.md, 'Config reference').",
    )
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def run(description: str, argv: list[str] | None, distill: bool) -> int:
    """Loads the config, then trains or distils. Returns the process exit code."""
    import yaml

    from slimforge.train.config import load_config, to_dict
    from slimforge.train.schema import RunConfig

    args = parse_args(description, argv)
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        from slimforge.train.engine import fit

        summary = fit(cfg, distill=distill)
    except SlimforgeError as e:
        return report_error(e)
    if summary["process_index"] != 0:
        return 0
    line = f"{summary['model']}: val acc {summary['val_acc']:.4f}"
    if "teacher_val_acc" in summary:
        line += f" (teacher {summary['teacher']}: {summary['teacher_val_acc']:.4f})"
    print(line)
    return 0
