"""The compression search's parts without training: config errors, the stage store, killed-trial retry, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from slimforge.export.searching.config import SearchConfig
from slimforge.export.searching.report import write_report
from slimforge.export.searching.stages import StageError, StageStore
from slimforge.export.searching.study import counted, fail_stale, open_study
from slimforge.train.config import load_config
from slimforge.train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def teacher(tmp_path: Path) -> str:
    ckpt = tmp_path / "teacher"
    ckpt.mkdir()
    (ckpt / "slimforge.json").write_text("{}")
    return str(ckpt)


def _cfg(tmp_path: Path, teacher: str, *overrides: str) -> SearchConfig:
    return load_config(
        SearchConfig,
        ROOT / "configs/search/mnist.yaml",
        [f"teacher={teacher}", f"output_dir={tmp_path / 'study'}", *overrides],
    )


def test_shipped_config_loads(tmp_path, teacher):
    cfg = _cfg(tmp_path, teacher)
    assert cfg.trials.count == 40 and cfg.target.runtime == "ort-cpu"


def test_bad_input_names_every_field(tmp_path, teacher):
    with pytest.raises(ConfigError) as e:
        _cfg(
            tmp_path,
            teacher,
            "space.students=[]",
            "space.lowrank.method=lowrnk",
            "target.runtime=ort-gpu",
            "space.precision=[int4]",
        )
    text = str(e.value)
    for needle in ("space.students: empty", "space.lowrank.method: 'lowrnk'", "target.runtime: 'ort-gpu'", "int4"):
        assert needle in text


def test_runtime_the_machine_lacks(tmp_path, teacher):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="ort-cuda is not available on this machine"):
        _cfg(tmp_path, teacher, "target.runtime=ort-cuda")


def test_stage_store_reuses_and_never_keeps_half_a_stage(tmp_path, caplog):
    store = StageStore(tmp_path / "stages")
    calls = []

    def build(folder: Path) -> dict:
        calls.append(folder)
        (folder / "out.txt").write_text("x")
        return {"val_acc": 0.5}

    first = store.run("distil", "distil tiny", {"epochs": 1}, ["t"], build)
    with caplog.at_level("INFO"):
        again = store.run("distil", "distil tiny", {"epochs": 1}, ["t"], build)
    assert len(calls) == 1 and again.reused and again.digest == first.digest
    assert f"reused stage {first.digest} (distil tiny, saved" in caplog.text
    other = store.run("distil", "distil tiny", {"epochs": 2}, ["t"], build)
    assert other.digest != first.digest and len(calls) == 2

    def broken(folder: Path) -> dict:
        (folder / "half.txt").write_text("x")
        raise StageError("it failed", "fix it")

    with pytest.raises(StageError):
        store.run("export", "export onnx", {}, [first.digest], broken)
    assert sorted(p.name for p in store.root.iterdir()) == sorted([first.digest, other.digest])


def test_killed_trial_is_failed_retried_and_not_counted(tmp_path, teacher):
    cfg = _cfg(tmp_path, teacher)
    Path(cfg.output_dir).mkdir(parents=True)
    study = open_study(cfg)
    # A worker process that asks a trial and dies without telling (as under SIGKILL).
    code = (
        "import sys, os, socket; sys.argv=['x']\n"
        "from slimforge.train.config import load_config\n"
        "from slimforge.export.searching.config import SearchConfig\n"
        "from slimforge.export.searching.study import open_study, suggest\n"
        f"cfg = load_config(SearchConfig, {str(ROOT / 'configs/search/mnist.yaml')!r}, "
        f"['teacher={teacher}', 'output_dir={cfg.output_dir}'])\n"
        "study = open_study(cfg); t = study.ask(); suggest(t, cfg.space)\n"
        "t.set_user_attr('worker', {'host': socket.gethostname(), 'pid': os.getpid()})\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
    study = open_study(cfg)
    (running,) = study.get_trials(states=(TrialState.RUNNING,))
    assert fail_stale(study, Path(cfg.output_dir)) == [running.number]
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and not counted(trials[0])
    assert trials[1].state == TrialState.WAITING and trials[1].system_attrs["failed_trial"] == running.number
    retry = study.ask()
    retry.set_user_attr("worker", {"host": os.uname().nodename, "pid": os.getpid()})  # as work() does
    assert retry.number == trials[1].number and retry.params == running.params
    assert fail_stale(study, Path(cfg.output_dir)) == []  # this process is alive: its trial is not stale


def test_no_trial_within_budgets_names_the_nearest(tmp_path, teacher):
    cfg = _cfg(tmp_path, teacher, "target.latency_ms=0.001")
    Path(cfg.output_dir).mkdir(parents=True)
    study = open_study(cfg)
    for acc, ms in [(0.9, 2.0), (0.8, 1.0), (0.7, 3.0)]:
        t = study.ask()
        t.suggest_categorical("student", ["resnet10t"])
        result = {"accuracy": acc, "teacher_accuracy": 0.95, "latency_ms": ms, "size_bytes": 10, "macs": 1}
        t.set_user_attr("result", result | {"fidelity": "short", "artifact": None})
        t.set_user_attr("status", "complete")
        study.tell(t, [acc, ms])
    report = write_report(study, cfg)
    assert report["recommended"] is None and report["front"] == [1, 0]
    assert report["nearest"][0] in (0, 1)
    saved = json.loads((Path(cfg.output_dir) / "search_report.json").read_text())
    assert [r["status"] for r in saved["trials"]] == ["complete"] * 3
    assert "No trial meets both budgets" in (Path(cfg.output_dir) / "pareto.md").read_text()


def test_trial_state_of_pruned_short_fidelity(tmp_path, teacher):
    from slimforge.export.searching.study import outrun_by

    cfg = _cfg(tmp_path, teacher)
    Path(cfg.output_dir).mkdir(parents=True)
    study = open_study(cfg)
    a = study.ask()
    a.set_user_attr("short", {"accuracy": 0.9, "latency_ms": 1.0, "teacher_accuracy": 0.95})
    b = study.ask()
    assert outrun_by(study, b.number, {"accuracy": 0.8, "latency_ms": 2.0}, 1.0) == a.number
    assert outrun_by(study, b.number, {"accuracy": 0.895, "latency_ms": 2.0}, 1.0) is None  # within the margin
    assert outrun_by(study, b.number, {"accuracy": 0.5, "latency_ms": 0.5}, 1.0) is None  # faster
    assert optuna.__version__.startswith("5.")
