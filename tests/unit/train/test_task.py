"""The distillation task keeps the teacher frozen: eval mode, no gradients, untouched by the optimizer."""

from __future__ import annotations

import torch
from torch import nn

from slimforge.train.losses import LossConfig
from slimforge.train.task import DistillationTask, SupervisedTask


def small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_teacher_is_frozen_and_untouched_by_a_training_step():
    teacher, student = small(0), small(1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = DistillationTask(teacher, LossConfig(temperature=2.0, alpha=0.5))
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    out = task(student, x, y)
    out["loss"].backward()
    opt.step()
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # BatchNorm running stats too: eval mode does not update them
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.grad is not None for p in student.parameters())
    assert set(out) == {"loss", "kd", "ce", "logits"}


def test_teacher_outputs_are_deterministic_in_the_task():
    teacher = small(0)
    task = DistillationTask(teacher, LossConfig())
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    student = small(1).eval()
    torch.testing.assert_close(task(student, x, y)["kd"], task(student, x, y)["kd"])  # dropout off in the teacher


def test_supervised_task_is_cross_entropy():
    model = small(2).eval()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    out = SupervisedTask(LossConfig())(model, x, y)
    torch.testing.assert_close(out["loss"], nn.functional.cross_entropy(model(x), y))
