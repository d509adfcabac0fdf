"""One trial's chain: distil → (prune / low-rank → distil) → (QAT) → export → benchmark, each through its CLI.

Training stages run ``train/distill.py`` under ``accelerate launch`` (the search's launch config picks the
topology), exports run ``export/export.py`` and the judgement runs ``export/benchmark.py``, each a subprocess whose
JSON output is read back: the search drives the same commands a user types. Every stage but the benchmark goes
through the :class:`StageStore`, so a stage another trial already computed is reused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimforge.export.searching.config import SearchConfig, student_model
from slimforge.export.searching.stages import Stage, StageError, StageStore, checkpoint_digest, log_tail, run_command

EXPORT_FORMAT = {"fp32": "onnx", "ptq-int8": "onnx-int8", "qat-int8": "onnx-qdq"}
"""The export format of each precision: float ONNX, post-training int8 ONNX, QDQ ONNX with the learned scales."""


@dataclass
class Recipe:
    """What one trial builds."""

    student: str
    prune: float | None
    lowrank: float | None
    precision: str
    temperature: float
    alpha: float

    def label(self) -> str:
        parts = [self.student]
        parts += [f"prune {self.prune:g}"] if self.prune is not None else []
        parts += [f"lowrank {self.lowrank:g}"] if self.lowrank is not None else []
        return ", ".join([*parts, self.precision, f"T {self.temperature:g}", f"alpha {self.alpha:g}"])


def _entry(name: str) -> str:
    """The path of a slimforge entry script (``train/distill.py``, ``export/export.py``, ...)."""
    import slimforge.export
    import slimforge.train

    package = slimforge.train if name.startswith("train/") else slimforge.export
    return str(Path(package.__file__).parent / name.split("/", 1)[1])


def _launcher() -> list[str]:
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate), "launch"] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chain:
    """Builds a trial's stages in ``store`` for search config ``cfg``; every trial of a worker shares one."""

    def __init__(self, cfg: SearchConfig, store: StageStore) -> None:
        self.cfg = cfg
        self.store = store
        self.teacher = str(Path(cfg.teacher).absolute())
        self.teacher_digest = checkpoint_digest(self.teacher)
        self.saved_s = 0.0
        self.stages: list[dict[str, Any]] = []
        self._teacher_onnx: Path | None = None

    def _note(self, stage: Stage) -> Stage:
        if stage.reused:
            self.saved_s += stage.seconds
        self.stages.append({"kind": stage.record["kind"], "digest": stage.digest, "reused": stage.reused})
        return stage

    def reset(self) -> None:
        """Starts a new trial's record of stages and time saved."""
        self.saved_s = 0.0
        self.stages = []

    # --- training stages -------------------------------------------------------------------------------------
    def run_config(self, model: dict, recipe: Recipe, steps: list[dict], epochs: int) -> dict[str, Any]:
        """The run config of a training stage (what ``train/distill.py --config`` reads), minus its output folder."""
        cfg = self.cfg
        return {
            "model": {**model, "allow_factory": cfg.space.allow_factory},
            "teacher": {"checkpoint": self.teacher},
            "data": dataclasses.asdict(cfg.data),
            "optim": dataclasses.asdict(cfg.optim),
            "loss": {"temperature": recipe.temperature, "alpha": recipe.alpha},
            "compress": steps,
            "train": {
                "epochs": epochs,
                "max_steps": cfg.trials.max_steps,
                "seed": cfg.trials.seed,
                "tensorboard": False,
            },
        }

    def launch_command(self, run_yaml: Path, output_dir: Path) -> list[str]:
        """``accelerate launch --config_file L train/distill.py --config run.yaml train.output_dir=...``."""
        launch = self.cfg.launch
        cmd = [*_launcher(), "--config_file", launch.config_file]
        cmd += ["--num_processes", str(launch.num_processes)] if launch.num_processes else []
        cmd += ["--main_process_port", str(_free_port())]  # two workers on one node must not share a port
        return [*cmd, _entry("train/distill.py"), "--config", str(run_yaml), f"train.output_dir={output_dir}"]

    def train_stage(self, kind: str, label: str, run: dict[str, Any], parents: list[str]) -> Stage:
        # Paths are left out of the address: the parents' digests stand for the checkpoints they name.
        anon = {**run, "teacher": None, "model": {**run["model"], "checkpoint": None}}
        inputs = {"run": anon, "launch": dataclasses.asdict(self.cfg.launch) | {"timeout_s": None}}

        def build(folder: Path) -> dict[str, Any]:
            import yaml

            (folder / "run.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
            cmd = self.launch_command(folder / "run.yaml", folder / "run")
            rc = run_command(cmd, folder, self.cfg.launch.timeout_s, label)
            if rc != 0:
                raise StageError(f"{label} failed (exit {rc}): {log_tail(folder)}", f"see {folder}/command.log")
            summary = json.loads((folder / "run" / "summary.json").read_text())
            return {k: summary.get(k) for k in ("val_acc", "teacher_val_acc", "steps")}

        return self._note(self.store.run(kind, label, inputs, parents, build))

    def train(self, recipe: Recipe, epochs: int) -> Stage:
        """The trained student of ``recipe`` at ``epochs``: distilled, then shrunk and distilled, then QAT."""
        run = self.run_config(student_model(recipe.student), recipe, [], epochs)
        stage = self.train_stage("distil", f"distil {recipe.student}", run, [self.teacher_digest])
        space = self.cfg.space
        steps = [space.prune.step(recipe.prune)] if recipe.prune is not None else []
        steps += [space.lowrank.step(recipe.lowrank)] if recipe.lowrank is not None else []
        if steps:
            parent = {"checkpoint": str(stage.path / "run" / "checkpoint")}
            run = self.run_config(parent, recipe, steps, epochs)
            label = f"{' + '.join(s['method'] for s in steps)} {recipe.student}"
            stage = self.train_stage("shrink", label, run, [stage.digest, self.teacher_digest])
        if recipe.precision == "qat-int8":
            parent = {"checkpoint": str(stage.path / "run" / "checkpoint")}
            run = self.run_config(parent, recipe, [{"method": "qat", **space.qat}], epochs)
            stage = self.train_stage("qat", f"qat {recipe.student}", run, [stage.digest, self.teacher_digest])
        return stage

    # --- export and benchmark --------------------------------------------------------------------------------
    def export_command(self, checkpoint: str, out: Path, fmt: str) -> list[str]:
        cmd = [sys.executable, _entry("export/export.py"), "--checkpoint", checkpoint, "--out", str(out)]
        cmd += ["--formats", fmt, "--max-images", str(min(self.cfg.benchmark.max_images, 256))]
        return cmd + (["--allow-factory"] if self.cfg.space.allow_factory else [])

    def export(self, checkpoint: str, parent: str, fmt: str, kind: str = "export") -> Stage:
        """The verified export of ``checkpoint`` in format ``fmt`` (a failed gate raises with its reason)."""

        def build(folder: Path) -> dict[str, Any]:
            rc = run_command(self.export_command(checkpoint, folder / "export", fmt), folder, 3600, "export")
            report = folder / "export" / "export_report.json"
            if rc == 1 and report.is_file():
                from slimforge.export.artifacts import failure_message

                reason = failure_message(json.loads(report.read_text()))
                raise StageError(f"export gate: {reason}", "see the export report")
            if rc != 0:
                raise StageError(f"export failed (exit {rc}): {log_tail(folder)}", f"see {folder}/command.log")
            artifact = json.loads(report.read_text())["artifacts"][0]["file"]
            return {"artifact": f"export/{artifact}"}

        return self._note(self.store.run(kind, f"{kind} {fmt}", {"format": fmt}, [parent], build))

    def teacher_onnx(self) -> Path:
        """The teacher exported to float ONNX (once per study): the reference the latency budget is read beside."""
        if self._teacher_onnx is None:
            stage = self.export(self.teacher, self.teacher_digest, "onnx", kind="teacher-export")
            self._teacher_onnx = stage.path / stage.record["facts"]["artifact"]
        return self._teacher_onnx

    def benchmark(self, artifact: Path, out: Path) -> dict[str, Any]:
        """Accuracy and latency of ``artifact`` and the teacher's ONNX on the target runtime, from one benchmark run.

        Returns:
            ``accuracy`` and ``teacher_accuracy`` (fractions, the same images), ``latency_ms`` (per batch of
            ``target.batch_size``), ``teacher_latency_ms``, ``size_bytes``, ``macs``, ``params``.
        """
        t, b = self.cfg.target, self.cfg.benchmark
        rt = t.runtime
        cmd = [sys.executable, _entry("export/benchmark.py"), "--teacher", self.teacher, "--out", str(out)]
        cmd += ["--student", f"{artifact}@{rt}", f"{self.teacher_onnx()}@{rt}", "--runtimes", rt]
        cmd += ["--batch-sizes", str(t.batch_size), "--runs", str(b.runs), "--rounds", str(b.rounds)]
        cmd += ["--min-round-s", str(b.min_round_s), "--warmup", str(b.warmup), "--max-images", str(b.max_images)]
        cmd += ["--peak-seconds", "0", "--no-progress", "--throughput-runs", str(max(1, b.runs // 10))]
        cmd += (["--threads", str(b.threads)] if b.threads else []) + (
            ["--allow-factory"] * self.cfg.space.allow_factory
        )
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        rc = run_command(cmd, out, 3600, "benchmark")
        if rc != 0 or not (out / "benchmark.json").is_file():
            raise StageError(f"benchmark failed (exit {rc}): {log_tail(out)}", f"see {out}/command.log")
        rows = json.loads((out / "benchmark.json").read_text())["rows"]
        teacher = next(r for r in rows if r["role"] == "teacher")
        student = _row(rows, artifact, rt)
        ref = _row(rows, self.teacher_onnx(), rt)
        return {
            "accuracy": student["accuracy"],
            "teacher_accuracy": teacher["accuracy"],
            "latency_ms": _latency(student, t.batch_size),
            "teacher_latency_ms": _latency(ref, t.batch_size),
            "size_bytes": student.get("size_bytes"),
            "macs": student.get("macs"),
            "params": student.get("params"),
        }


def _row(rows: list[dict[str, Any]], artifact: Path, runtime: str) -> dict[str, Any]:
    for r in rows:
        if r["role"] != "teacher" and Path(r["artifact"]) == Path(artifact) and r["runtime"] == runtime:
            if r["status"] != "ok":
                raise StageError(f"benchmark of {artifact} on {runtime}: {r['status']}: {r.get('reason')}", r["fix"])
            return r
    raise StageError(f"the benchmark report has no {runtime} row for {artifact}", "see its benchmark.json")


def _latency(row: dict[str, Any], batch_size: int) -> float:
    """Milliseconds per batch of ``batch_size``: the batch-1 p50, or the swept batch's mean time."""
    if batch_size == 1:
        return float(row["latency_ms"]["p50"])
    return float(next(s["ms_per_batch"] for s in row["throughput"] if s["batch_size"] == batch_size))
