"""The search's result: ``search_report.json``, the Pareto front as a markdown table, the front's artifacts in one
folder, and the recommended artifact (the fastest within both budgets) with the commands that reproduce it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimforge.export.searching.config import SearchConfig
from slimforge.export.searching.study import counted

if TYPE_CHECKING:
    import optuna

REPORT = "search_report.json"


def _row(t: optuna.trial.FrozenTrial, cfg: SearchConfig) -> dict[str, Any]:
    from optuna.trial import TrialState

    r = t.user_attrs.get("result") or {}
    killed = t.state == TrialState.FAIL and not counted(t)
    row = {
        "number": t.number,
        "status": "killed" if killed else t.user_attrs.get("status", t.state.name.lower()),
        "reason": t.user_attrs.get("reason"),
        "recipe": dict(t.params),
        "retry_of": t.system_attrs.get("failed_trial"),
        "stages": t.user_attrs.get("stages", []),
        "saved_s": t.user_attrs.get("saved_s", 0.0),
        "seconds": t.user_attrs.get("seconds"),
    }
    row.update({k: r.get(k) for k in ("fidelity", "accuracy", "teacher_accuracy", "latency_ms", "teacher_latency_ms")})
    row.update({k: r.get(k) for k in ("size_bytes", "macs", "params", "artifact", "checkpoint")})
    if r.get("accuracy") is not None:
        row["accuracy_drop"] = round(100 * (r["teacher_accuracy"] - r["accuracy"]), 3)
        row["within_budgets"] = (
            row["accuracy_drop"] <= cfg.target.accuracy_drop and r["latency_ms"] <= cfg.target.latency_ms
        )
    return row


def _front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = [r for r in rows if r["status"] == "complete"]
    return sorted(
        (
            r
            for r in done
            if not any(
                o["accuracy"] >= r["accuracy"]
                and o["latency_ms"] <= r["latency_ms"]
                and (o["accuracy"] > r["accuracy"] or o["latency_ms"] < r["latency_ms"])
                for o in done
            )
        ),
        key=lambda r: r["latency_ms"],
    )


def reproduce(row: dict[str, Any], store: Path) -> list[str]:
    """The commands that rebuild a trial's artifact, stage by stage (each stage's exact command)."""
    out = []
    for s in row["stages"]:
        cmd_file = store / s["digest"] / "command.json"
        if s["kind"] != "teacher-export" and cmd_file.is_file():
            cmd = " ".join(json.loads(cmd_file.read_text()))
            for tmp in (store).glob(".tmp-*"):
                cmd = cmd.replace(str(tmp), "")
            out.append(_untmp(cmd, s["digest"]))
    return out


def _untmp(cmd: str, digest: str) -> str:
    import re

    return re.sub(r"\.tmp-(" + digest + r")-[^/ ]+", r"\1", cmd)


def write_report(study: optuna.Study, cfg: SearchConfig) -> dict[str, Any]:
    """Writes the report files into ``cfg.output_dir`` (atomically each) and returns the report."""
    from optuna.trial import TrialState

    folder = Path(cfg.output_dir)
    rows = [_row(t, cfg) for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    front = _front(rows)
    within = sorted(
        (r for r in rows if r.get("within_budgets") and r["status"] == "complete"),
        key=lambda r: (r["latency_ms"], r["size_bytes"] or 0),
    )
    recommended = within[0] if within else None
    nearest = sorted(
        (r for r in rows if r["status"] == "complete"),
        key=lambda r: (
            max(r["accuracy_drop"] - cfg.target.accuracy_drop, 0) / max(cfg.target.accuracy_drop, 1e-9)
            + max(r["latency_ms"] - cfg.target.latency_ms, 0) / cfg.target.latency_ms
        ),
    )[:3]
    front_dir = folder / "front"
    shutil.rmtree(front_dir, ignore_errors=True)
    front_dir.mkdir(parents=True)
    for r in front:
        if r["artifact"] and os.path.exists(r["artifact"]):
            shutil.copy2(r["artifact"], front_dir / f"trial{r['number']}_{Path(r['artifact']).name}")
    report = {
        "format": "slimforge.search",
        "budgets": {
            "runtime": cfg.target.runtime,
            "batch_size": cfg.target.batch_size,
            "latency_ms": cfg.target.latency_ms,
            "accuracy_drop_points": cfg.target.accuracy_drop,
        },
        "trials": rows,
        "front": [r["number"] for r in front],
        "recommended": None,
        "nearest": [r["number"] for r in nearest] if recommended is None else [],
        "time_saved_s": round(sum(r["saved_s"] or 0 for r in rows), 2),
    }
    if recommended is not None:
        report["recommended"] = {
            "trial": recommended["number"],
            "artifact": recommended["artifact"],
            "reproduce": reproduce(recommended, folder / "stages"),
        }
    _atomic(folder / REPORT, json.dumps(report, indent=2, default=str))
    _atomic(folder / "pareto.md", markdown(front, report))
    return report


def markdown(front: list[dict[str, Any]], report: dict[str, Any]) -> str:
    b = report["budgets"]
    lines = [
        f"# Pareto front ({b['runtime']}, batch {b['batch_size']}; budgets: {b['latency_ms']:g} ms, "
        f"{b['accuracy_drop_points']:g} points below the teacher)",
        "",
        "| trial | student | prune | lowrank | precision | accuracy | drop (points) | latency ms | size KB | MACs "
        "| within budgets |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in front:
        p = r["recipe"]
        lines.append(
            f"| {r['number']} | {p.get('student')} | {p.get('prune')} | {p.get('lowrank')} | {p.get('precision')} "
            f"| {r['accuracy']:.4f} | {r['accuracy_drop']:.2f} | {r['latency_ms']:.3f} "
            f"| {(r['size_bytes'] or 0) / 1024:.0f} | {r['macs']} | {'yes' if r['within_budgets'] else 'no'} |"
        )
    rec = report["recommended"]
    lines.append("")
    if rec:
        lines += [f"Recommended: trial {rec['trial']}, `{rec['artifact']}`. Reproduce:", "", "```bash"]
        lines += [*rec["reproduce"], "```"]
    else:
        lines.append(f"No trial meets both budgets; nearest trials: {report['nearest']}.")
    return "\n".join(lines) + "\n"


def write_config(cfg: SearchConfig) -> None:
    """Writes the resolved config to ``output_dir/search_config.yaml`` (atomically; workers may write it at once)."""
    import yaml

    from slimforge.train.config import to_dict

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    _atomic(Path(cfg.output_dir) / "search_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
