"""The run plan: which rows a benchmark measures (artifacts × selected runtimes), decided before any is run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slimforge.export.runtimes import artifact_kind, available_runtimes, runtime_class, runtimes_for_kind


@dataclass
class Target:
    """One row to measure: a path, the runtime to run it with (``None``: its kind's default) and its role."""

    path: Path
    runtime: str | None
    role: str
    skip: str | None = None
    """Why it is not measured, decided while planning."""


def parse_target(text: str, role: str) -> Target:
    """``PATH`` or ``PATH@RUNTIME`` (e.g. ``out/model.onnx@ort-cuda``)."""
    head, sep, tail = text.rpartition("@")
    if sep and tail in available_runtimes():
        return Target(Path(head), tail, role)
    return Target(Path(text), None, role)


def selected_runtimes(selection: list[str]) -> list[str]:
    """Runtime names a selection means, in registration order: ``default`` = all that are not opt-in."""
    names: set[str] = set()
    for item in selection:
        if item == "all":
            names.update(available_runtimes())
        elif item == "default":
            names.update(n for n in available_runtimes() if not runtime_class(n).opt_in)
        else:
            names.add(item)
    return [n for n in available_runtimes() if n in names]


def plan_rows(students: list[str], selection: list[str]) -> list[Target]:
    """The student rows: each artifact × every selected runtime for its kind (one row when it names a runtime).

    An artifact that does not exist, or whose kind no runtime runs, keeps one row that will report the error;
    one whose kind no *selected* runtime runs keeps one skipped row that says which runtimes would.
    """
    chosen = selected_runtimes(selection)
    rows = []
    for text in students:
        target = parse_target(text, "student")
        if target.runtime is not None or not target.path.exists():
            rows.append(target)
            continue
        kind = artifact_kind(target.path)
        names = [n for n in runtimes_for_kind(kind) if n in chosen]
        if names:
            rows.extend(Target(target.path, n, "student") for n in names)
        elif runtimes_for_kind(kind):
            target.skip = (
                f"none of the selected runtimes runs a {kind} artifact; select one of "
                f"{', '.join(runtimes_for_kind(kind))} with --runtimes"
            )
            rows.append(target)
        else:
            rows.append(target)  # measuring it reports "no runtime runs ..."
    return rows
