"""The teacher sees what it was trained on: a teacher trained at another size, channel count and normalisation
gets each student batch converted inside the task, and is as accurate there as in its own evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimforge.train.checkpoint import load_checkpoint
from slimforge.train.data import build_loader, describe, load_splits
from slimforge.train.models import ModelConfig
from slimforge.train.models.load import load_or_build
from slimforge.train.task import teacher_view
from slimforge.train.teacher import AdaptedTeacher, TeacherInput
from tests.conftest import tiny_data_config, train_checkpoint

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_the_conversion_undoes_one_normalisation_resizes_and_applies_the_other():
    torch.manual_seed(0)
    raw = torch.rand(3, 1, 32, 32)  # pixels in [0, 1]
    s_mean, s_std = [0.1307], [0.3081]
    view = TeacherInput(([1, 32, 32], s_mean, s_std), ([3, 64, 64], *IMAGENET), "bilinear")
    got = view((raw - s_mean[0]) / s_std[0])
    # Enlarging: bicubic whatever the teacher's interpolation, clipped to the pixel range.
    up = F.interpolate(raw.expand(-1, 3, -1, -1), size=(64, 64), mode="bicubic", align_corners=False, antialias=True)
    up = up.clamp(0, 1)
    want = (up - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    assert got.shape == (3, 3, 64, 64) and torch.allclose(got, want, atol=1e-5)
    down = TeacherInput(([1, 32, 32], s_mean, s_std), ([1, 16, 16], [0.5], [0.5]), "bilinear")
    shrunk = F.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(down((raw - s_mean[0]) / s_std[0]), (shrunk - 0.5) / 0.5, atol=1e-5)
    gray = TeacherInput(([3, 8, 8], *IMAGENET), ([1, 8, 8], [0.0], [1.0]))
    rgb = torch.rand(2, 3, 8, 8)
    luma = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    normed = (rgb - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    assert torch.allclose(gray(normed), luma, atol=1e-5)


def predict(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predictions and labels over ``loader``."""
    preds, labels = [], []
    with torch.no_grad():
        for b in loader:
            preds.append(model(b["pixel_values"]).argmax(1))
            labels.append(b["label"])
    return torch.cat(preds), torch.cat(labels)


def test_a_64px_imagenet_normalised_teacher_is_as_accurate_inside_a_32px_task(tmp_path):
    rgb64 = dict(image_size=64, in_chans=3, mean=IMAGENET[0], std=IMAGENET[1])
    # timm's test_resnet (half resnet10t's training time at 64 px), judged on the whole held-out split.
    teacher_data = tiny_data_config(**rgb64, max_train_samples=1024, batch_size=32, augment=False, max_val_samples=1000)
    ckpt = train_checkpoint(tmp_path / "teacher64", "test_resnet", steps=150, data=teacher_data)
    own, labels = predict(
        load_checkpoint(ckpt)[0].eval(), build_loader(load_splits(teacher_data).val, teacher_data, False)
    )

    student_data = tiny_data_config(image_size=32, in_chans=1, max_val_samples=1000)  # MNIST's own statistics
    splits, info = load_splits(student_data), describe(student_data)
    teacher, spec = load_or_build(ModelConfig(checkpoint=str(ckpt)), "teacher", 10, info["input_size"], info,
                                  splits.class_names)  # fmt: skip
    assert spec.input_size == [3, 64, 64] and spec.mean == IMAGENET[0]  # its own input, not the student's
    inside = teacher_view(teacher.eval(), spec, info)
    assert isinstance(inside, AdaptedTeacher)
    loader = build_loader(splits.val, student_data, False)
    in_task, task_labels = predict(inside, loader)
    # Without the renormalisation (resized and RGB, but in MNIST's statistics): what a silent mismatch gives.
    stats = TeacherInput((info["input_size"], list(info["mean"]), list(info["std"])),
                         ([3, 64, 64], list(info["mean"]) * 3, list(info["std"]) * 3))  # fmt: skip
    naive, _ = predict(AdaptedTeacher(teacher.eval(), stats), loader)
    acc = {k: float((p == labels).float().mean()) for k, p in (("own", own), ("task", in_task), ("naive", naive))}
    agree = float((in_task == own).float().mean())
    # The digits where the two disagree on being right (McNemar's discordant pairs): one way and the other.
    lost = int(((own == labels) & (in_task != labels)).sum())
    gained = int(((own != labels) & (in_task == labels)).sum())
    print(f"teacher at 64 px: own pipeline {acc['own']:.4f}, inside the 32-px task {acc['task']:.4f} (agreement "
          f"{agree:.4f}; right only in its own pipeline {lost}, only inside the task {gained}), without its "
          f"normalisation {acc['naive']:.4f}")  # fmt: skip
    # The same 1,000 digits: 28 → 64 px in its own pipeline, 28 → 32 → 64 px inside the task.
    assert torch.equal(task_labels, labels) and acc["own"] > 0.8
    assert agree >= 0.97 and abs(acc["task"] - acc["own"]) <= 0.02, acc
