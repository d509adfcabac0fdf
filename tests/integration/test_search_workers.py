"""The search for real: workers on one journal study, one killed mid-trial (SIGKILL) and restarted, stage reuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, make_checkpoint, tiny_data_config

pytestmark = pytest.mark.slow


def _worker(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, str(ROOT / "export/search.py"), "--config", str(config)]
    # Its own process group: the kill takes the worker and its stage subprocesses, as a scheduler kills a job.
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def test_two_workers_a_killed_trial_and_stage_reuse(tmp_path):
    data = tiny_data_config(image_size=16, max_train_samples=64, max_val_samples=32, batch_size=16)
    teacher = make_checkpoint(tmp_path / "teacher" / "checkpoint", "resnet10t", data=data)
    study = tmp_path / "study"
    config = tmp_path / "search.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "teacher": str(teacher),
                "output_dir": str(study),
                "data": {k: getattr(data, k) for k in ("source", "name", "in_chans", "image_size", "batch_size")}
                | {"num_workers": 0, "max_train_samples": 64, "max_val_samples": 32},
                "space": {"students": ["resnet10t"], "precision": ["fp32"]},
                "target": {"latency_ms": 1000.0, "accuracy_drop": 100.0},
                "trials": {"count": 3, "short_epochs": 1, "long_epochs": None, "max_steps": 1, "startup_trials": 1},
                "benchmark": {"max_images": 16, "runs": 5, "rounds": 2, "min_round_s": 0.01, "warmup": 1},
                "launch": {"config_file": str(ROOT / "configs/accelerate/single.yaml")},
            }
        )
    )
    first = _worker(config, tmp_path / "w0.log")
    deadline = time.time() + 300
    while not list((study / "stages").glob(".tmp-*")) and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, (tmp_path / "w0.log").read_text()[-2000:]
    os.killpg(first.pid, signal.SIGKILL)  # mid-trial: a stage is being computed
    first.wait()

    workers = [_worker(config, tmp_path / f"w{i}.log") for i in (1, 2)]
    codes = [w.wait(timeout=600) for w in workers]
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in (1, 2))
    assert codes == [0, 0], logs[-3000:]

    report = json.loads((study / "search_report.json").read_text())
    by_status = {}
    for t in report["trials"]:
        by_status.setdefault(t["status"], []).append(t)
    assert len(by_status["complete"]) == 3, report["trials"]  # the count holds across both workers
    (killed,) = by_status["killed"]
    assert any(t["retry_of"] == killed["number"] for t in by_status["complete"])
    # No trial ran twice: each completed trial's benchmark folder exists once, under its own number.
    assert len({t["number"] for t in by_status["complete"]}) == 3
    assert "was killed" in logs and "reused stage" in logs and "(distil resnet10t, saved" in logs
    assert report["time_saved_s"] > 0 and report["recommended"] is not None
    assert not list((study / "stages").glob(".tmp-*"))
