"""Bad input: one clear message naming the problem and the fix, exit code 2, and no output left behind."""

from __future__ import annotations

import sys

import pytest

from slimforge.train import distill, train
from tests.conftest import ROOT, make_checkpoint, run_cmd

TINY_TRAIN = str(ROOT / "configs/debug/tiny_train.yaml")
TINY_DISTILL = str(ROOT / "configs/debug/tiny_distill.yaml")


def check_rejected(capsys, entry, argv, out_dir, *needles):
    code = entry.main(argv + [f"train.output_dir={out_dir}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "fix: " in err and "Traceback" not in err
    for needle in needles:
        assert needle in err
    assert not out_dir.exists(), "a rejected run must not leave an output folder"
    return err


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["optim.learning_rate=0.1"], ["optim.learning_rate: unknown key"]),
        (["data.batch_size=large"], ["data.batch_size: expected int, got str 'large'"]),
        (["data.source=imagefolder", "data.path={tmp}/no_such_folder"], ["does not exist", "data.path"]),
        (["model.name=resnet10x"], ["timm has no model named 'resnet10x'", "close names", "resnet10t"]),
        (["model.name=vit_tiny_patch16_224"], ["cannot take input [1, 32, 32]", "img_size"]),
        (
            ["compress=[{method: qat, freeze_observer_step: 3}]"],
            ["compress[0].freeze_observer_step: unknown key; did you mean 'freeze_observers_step'?"],
        ),
        (
            ["compress=[{method: qat, activations: int8}]"],
            ["compress[0].activations: int8 cannot be taken by backend ort-cpu", "use activations: uint8"],
        ),
        (["compress=[{method: qat, calibration_images: 0}]"], ["compress[0].calibration_images: 0 must be >= 1"]),
        (
            ["model.source=factory", "model.name=tests.factories:tiny_upsampler", "compress=[{method: qat}]"],
            ["compress step 'qat'", "the int8 backend cannot run", "2 (ConvTranspose2d)", "`skip` option"],
        ),
    ],
    ids=[
        "unknown_key",
        "wrong_type",
        "missing_dataset_path",
        "unknown_timm_model",
        "impossible_image_size",
        "qat_unknown_option",
        "qat_activation_type",
        "qat_no_calibration_images",
        "qat_layer_without_int8_kernel",
    ],
)
def test_bad_training_input(tmp_path, capsys, overrides, needles):
    argv = ["--config", TINY_TRAIN, *(o.replace("{tmp}", str(tmp_path)) for o in overrides)]
    check_rejected(capsys, train, argv, tmp_path / "o", *needles)


def test_teacher_and_student_with_different_num_classes(tmp_path, capsys, teacher_ckpt):
    # The teacher checkpoint has 10 classes; the synthetic dataset has 4.
    check_rejected(
        capsys,
        distill,
        [
            "--config",
            TINY_DISTILL,
            f"teacher.checkpoint={teacher_ckpt}",
            "data.source=synthetic",
            "data.synthetic_classes=4",
            "data.in_chans=1",
        ],
        tmp_path / "o",
        "has 10 classes but the dataset has 4",
    )
    check_rejected(
        capsys,
        distill,
        ["--config", TINY_DISTILL, f"teacher.checkpoint={teacher_ckpt}", "model.num_classes=5"],
        tmp_path / "o",
        "model.num_classes is 5 but the dataset has 10 classes",
    )


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_truncated_or_corrupted_teacher_checkpoint(tmp_path, capsys, damage):
    ckpt = make_checkpoint(tmp_path / "teacher")
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 1000]
    else:
        data[-50] ^= 0xFF
    weights.write_bytes(bytes(data))
    check_rejected(
        capsys,
        distill,
        ["--config", TINY_DISTILL, f"teacher.checkpoint={ckpt}"],
        tmp_path / "o",
        "truncated" if damage == "truncated" else "SHA-256",
        "fix: ",
    )


def test_distill_without_a_teacher(tmp_path, capsys):
    check_rejected(capsys, distill, ["--config", TINY_TRAIN], tmp_path / "o", "needs a teacher")


def test_an_existing_run_is_not_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "run"
    make_checkpoint(out / "checkpoint")
    code = train.main(["--config", TINY_TRAIN, f"train.output_dir={out}"])
    assert code == 2 and "already holds a finished run" in capsys.readouterr().err


def test_the_script_exits_non_zero_without_a_traceback(tmp_path):
    proc = run_cmd(
        [sys.executable, "train/train.py", "--config", TINY_TRAIN, "model.nme=x", f"train.output_dir={tmp_path / 'o'}"]
    )
    assert proc.returncode == 2
    assert "model.nme: unknown key; did you mean 'name'?" in proc.stderr and "Traceback" not in proc.stderr


def test_a_sharded_teacher_needs_several_processes(tmp_path, capsys, teacher_ckpt):
    check_rejected(
        capsys,
        distill,
        ["--config", TINY_DISTILL, f"teacher.checkpoint={teacher_ckpt}", "train.teacher_placement=sharded"],
        tmp_path / "o",
        "teacher_placement=sharded",
        "launch with 2 or more processes",
    )
