"""A task with trainable parts under a real 2-process DDP launch: FitNets hint projectors are trained and kept in
sync with the student, saved in the resumable states and resumed with it, and left out of the checkpoint; with the
teacher sharded across the ranks they train the same student."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from tests.integration.test_distributed import (  # noqa: F401 (fixture)
    distill_tiny,
    relative_difference,
    tiny_teacher,
    train_losses,
    weights,
)

# Student tiny_convnet (width 8): layer "2" is its second conv, 16 channels; the teacher's (width 16) has 32.
HINT = [
    "loss.task=hint",
    "loss.hints=[{student: '2', teacher: '2', weight: 0.5}]",
    "train.epochs=2",
    "train.max_steps=null",
    "train.checkpoint_every=4",
    "train.keep_states=4",
    "train.log_every=1",
]


@pytest.mark.slow
def test_hint_adapters_train_sync_resume_with_the_student_and_stay_out_of_the_checkpoint(tmp_path, tiny_teacher):  # noqa: F811
    full = tmp_path / "full"
    proc = distill_tiny("ddp.yaml", tiny_teacher, full, *HINT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 16
    assert "hint 2 [16, 4, 4] -> teacher 2 [32, 4, 4] (projector 16 -> 32 channels)" in proc.stderr
    record = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all("hint_2" in r for r in record if r["split"] == "train")

    # The checkpoint is the student alone; the states hold the projector (its weights moved from their init).
    student = weights(full / "checkpoint")
    assert not any(k.startswith(("adapters", "student.")) for k in student)
    first = load_file(str(full / "state" / "step_00000008" / "model.safetensors"))
    last = load_file(str(full / "state" / "step_00000016" / "model.safetensors"))
    proj = "adapters.2.proj.0.weight"
    assert proj in first and (first[proj] - last[proj]).abs().max() > 0

    # Killed after update 8: its states and the run's outputs up to there, relaunched with the same command.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("checkpoint", "summary.json", "step_00000012",
                                                                   "step_00000016", "tensorboard"))  # fmt: skip
    proc = distill_tiny("ddp.yaml", tiny_teacher, resumed, *HINT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((resumed / "summary.json").read_text())["resumed_from_step"] == 8
    expected, got = train_losses(full), train_losses(resumed)
    for step in range(9, 17):  # the hint term depends on the projector: equal losses need it resumed exactly
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), f"step {step}"
    assert relative_difference(weights(resumed / "checkpoint"), student) < 1e-6

    # The teacher sharded across the ranks (FSDP2): the hook reads the layer's output after its all-gather, so the
    # hint losses and the student are the replicated teacher's, while each rank holds half of the teacher.
    sharded = tmp_path / "sharded"
    proc = distill_tiny("ddp.yaml", tiny_teacher, sharded, *HINT, "train.teacher_placement=sharded")
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = json.loads((sharded / "summary.json").read_text())["teacher_param_bytes_per_rank"]
    assert held == [summary["teacher_param_bytes_per_rank"][0] // 2] * 2
    assert train_losses(sharded) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert relative_difference(weights(sharded / "checkpoint"), student) < 1e-6
