"""A resume cannot continue the wrong run, and a launch that cannot train as asked stops instead of training
something else. Real `accelerate launch`, 2 CPU processes over gloo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from slimforge.train.engine.outputs import cuda_unusable_reason
from tests.conftest import GPU_NODE, distill_here, launch_args, run_cmd
from tests.integration.test_distributed import ENV, tiny_teacher, train_losses  # noqa: F401 (fixture)

CONFIG = "configs/debug/tiny_equivalence.yaml"


def states(out: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "slimforge_state.json").read_text()) for p in sorted((out / "state").iterdir())}


def crash_after_last_state(out: Path) -> None:
    """Leaves ``out`` as a run killed after its last resumable state and before its final checkpoint."""
    shutil.rmtree(out / "checkpoint")
    (out / "summary.json").unlink()


@pytest.mark.slow
def test_a_changed_run_is_refused_and_a_fresh_start_clears_the_old_states(tmp_path, tiny_teacher, capsys):  # noqa: F811
    """One process, in this one: the check is the run config's, whatever the topology (a 2-process refusal printed
    once is tests/integration/test_cli_errors.py's)."""
    out = tmp_path / "run"
    base = [
        f"teacher.checkpoint={tiny_teacher}",
        "teacher.allow_factory=true",
        "data.batch_size=16",
        "train.checkpoint_every=2",
        "train.max_steps=4",
        "train.log_every=1",
        f"train.output_dir={out}",
    ]
    assert distill_here(CONFIG, *base) == 0
    crash_after_last_state(out)
    saved = states(out)
    assert list(saved) == ["step_00000002", "step_00000004"]
    assert saved["step_00000004"]["fingerprint"]["data.batch_size"] == 16

    # Another batch size and LR against those states: refused by name, states untouched, nothing trained.
    capsys.readouterr()
    assert distill_here(CONFIG, *base, "data.batch_size=8", "optim.lr=0.02") == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1, err[-3000:]
    changed = "is the state of a different run: since it was saved, data.batch_size: 16 -> 8; optim.lr: 0.01 -> 0.02"
    assert changed in err
    fresh_start = "or start afresh with train.resume=false (or train.overwrite=true), which deletes the old states"
    assert fresh_start in err
    assert states(out) == saved and not (out / "checkpoint").exists()

    # (Fields that change neither the numerics nor the schedule may change: tests/unit/train/test_state.py.)

    # The fresh-start flag: old states deleted, training from update 1 with the new settings.
    assert distill_here(CONFIG, *base, "data.batch_size=8", "train.resume=false") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] is None and summary["global_batch"] == 8
    assert min(train_losses(out)) == 1 and max(train_losses(out)) == 4
    fresh = states(out)
    assert list(fresh) == ["step_00000002", "step_00000004"]
    assert all(m["fingerprint"]["data.batch_size"] == 8 for m in fresh.values())


def test_a_node_whose_gpus_torch_cannot_use_stops_instead_of_training_on_the_cpu(tmp_path, tiny_teacher):  # noqa: F811
    """The scheduler assigned a GPU (CUDA_VISIBLE_DEVICES) that torch cannot use: a DDP launch would silently
    train on the CPU; it stops with one message instead."""
    if torch.cuda.is_available() or GPU_NODE:
        pytest.skip("checks a node where CUDA is unusable (this one has a usable NVIDIA driver)")
    out = tmp_path / "run"
    args = launch_args("ddp.yaml", "train/distill.py", CONFIG, f"teacher.checkpoint={tiny_teacher}",
                       "teacher.allow_factory=true", "data.batch_size=16", f"train.output_dir={out}")  # fmt: skip
    proc = run_cmd(args, env={**ENV, "CUDA_VISIBLE_DEVICES": "0"}, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: this node has GPUs (CUDA_VISIBLE_DEVICES=0) but torch") == 1, proc.stderr[-3000:]
    assert "this run would train on the CPU instead" in proc.stderr and "train.cpu=true" in proc.stderr
    assert not out.exists()


def test_gpus_are_detected_from_the_scheduler_and_the_driver(monkeypatch):
    if torch.cuda.is_available() or GPU_NODE:
        pytest.skip("checks a node where CUDA is unusable (this one has a usable NVIDIA driver)")
    for visible in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert cuda_unusable_reason() is None or "/dev/nvidia" in cuda_unusable_reason()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert "this node has GPUs" in cuda_unusable_reason()
