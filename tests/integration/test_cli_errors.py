"""Bad input: one clear message naming the problem and the fix, exit code 2, and no output left behind."""

from __future__ import annotations

import json
import sys

import pytest

from slimforge.train import distill, train
from tests.conftest import DIGITS, ROOT, make_checkpoint, run_cmd

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


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    out = tmp_path / "notes.txt" / "run"
    code = train.main(["--config", TINY_TRAIN, f"train.output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error: ") == 1
    assert "train.output_dir" in err and "is a file, not a folder" in err and "fix: choose a folder" in err


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


# ---- The real entries as a user runs them, each in a fresh process: one message, exit code 2, nothing written.


def assert_one_error(proc, *needles: str) -> str:
    """Exit code 2, no traceback, and exactly one ``error:`` message (log lines may precede it) with its fix."""
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    starts = [i for i, line in enumerate(err.splitlines()) if line.startswith("error: ")]
    assert len(starts) == 1, err[-3000:]
    message = "\n".join(err.splitlines()[starts[0] :])
    assert "\n  fix: " in message
    for needle in needles:
        assert needle in message, message
    return message


def entry(script: str, *args: str, env: dict | None = None):
    return run_cmd([sys.executable, script, *map(str, args)], env=env)


@pytest.mark.parametrize(
    "script, override, needle",
    [
        ("train/train.py", "model.name=!!python/object/apply:os.system ['touch {tmp}/ran']", "tag !!python/object"),
        ("train/distill.py", "compress=[{method: qat", "the value is not plain YAML (expected ',' or '}'"),
    ],
    ids=["python_tag", "malformed"],
)
def test_an_override_that_is_not_plain_yaml(tmp_path, script, override, needle):
    out = tmp_path / "o"
    proc = entry(script, "--config", TINY_DISTILL, override.replace("{tmp}", str(tmp_path)), f"train.output_dir={out}")
    assert assert_one_error(proc, needle).startswith("error: invalid config:\n  - override ")
    assert proc.stderr.startswith("error: ")
    assert not out.exists() and not (tmp_path / "ran").exists()


def test_a_teacher_whose_class_names_are_in_another_order(tmp_path):
    names = [f"class_{i}" for i in (1, 0, *range(2, 10))]  # the synthetic data's classes, two swapped
    teacher = make_checkpoint(tmp_path / "teacher", class_names=names)
    out = tmp_path / "o"
    data = ["data.source=synthetic", "data.in_chans=1", "data.synthetic_samples=64"]
    proc = entry(
        "train/distill.py", "--config", TINY_DISTILL, *data, f"teacher.checkpoint={teacher}", f"train.output_dir={out}"
    )
    assert_one_error(
        proc,
        f"error: teacher checkpoint {teacher} names its classes differently from the dataset: position 0 is 'class_1' "
        "in the checkpoint, 'class_0' in the dataset (the same names in another order)",
        "  checkpoint: ['class_1', 'class_0', 'class_2',",
        "fix: use the dataset the checkpoint was trained on, with the same classes in the same order",
    )
    assert not out.exists()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A float checkpoint and broken or untrusted copies of it."""

    from slimforge.train.checkpoint import META, load_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    good = make_checkpoint(root / "good")
    found = {"good": good}
    for name, edit in (("unknown_field", {"colour": "red"}), ("unknown_source", {"source": "keras"})):
        path = make_checkpoint(root / name)
        meta = json.loads((path / META).read_text())
        meta["model"].update(edit)
        (path / META).write_text(json.dumps(meta))
        found[name] = path
    model, spec, meta = load_checkpoint(good)
    state = model.state_dict()
    state["fc.weight"][0, 0] = float("nan")  # what a diverged run would have saved
    found["nan"] = save_checkpoint(state, spec, root / "nan", extra=meta["extra"])
    found["factory"] = make_checkpoint(root / "factory", name="tests.factories:tiny_convnet", source="factory")
    found["shuffled"] = make_checkpoint(root / "shuffled", class_names=["1", "0", *DIGITS[2:]])
    return found


@pytest.mark.parametrize(
    "case, needles",
    [
        ("data_tag", ["override 'source=!!python/name:os.system': the value is not plain YAML", "tag !!python/name"]),
        ("out_under_a_file", ["output folder", "cannot be created:", "is a file, not a folder"]),
        ("unknown_field", ["slimforge.json: the model description has unknown field 'colour'"]),
        ("nan", ["holds non-finite values (nan/inf) in fc.weight", "fix: retrain"]),
        (
            "factory",
            [
                "was built by the user factory 'tests.factories:tiny_convnet'",
                "fix: if you trust that code, pass --allow-factory",
            ],
        ),
    ],
)
def test_export_refuses(tmp_path, checkpoints, case, needles):
    ckpt = checkpoints.get(case, checkpoints["good"])
    out = tmp_path / "export"
    args = ["--checkpoint", ckpt, "--out", out, "--max-images", "8"]
    if case == "data_tag":
        args += ["--data", "source=!!python/name:os.system"]
    if case == "out_under_a_file":
        (tmp_path / "notes.txt").write_text("x")
        out = tmp_path / "notes.txt" / "export"
        args[3] = out
    proc = entry("export/export.py", *args)
    assert_one_error(proc, *needles)
    assert proc.stderr.startswith("error: ")  # refused before any work: nothing logged first
    assert not out.exists()


@pytest.mark.parametrize(
    "case, needles",
    [
        ("out_under_a_file", ["output folder", "is a file, not a folder"]),
        ("unknown_source", ["slimforge.json: the model description has unknown model source 'keras'"]),
        ("shuffled", ["names its classes differently from the evaluation data: position 0 is '1' in the student"]),
    ],
)
def test_benchmark_refuses_before_measuring(tmp_path, checkpoints, case, needles):
    out = tmp_path / "bench"
    teacher = checkpoints["unknown_source"] if case == "unknown_source" else checkpoints["good"]
    student = checkpoints["shuffled"] if case == "shuffled" else checkpoints["good"]
    if case == "out_under_a_file":
        (tmp_path / "notes.txt").write_text("x")
        out = tmp_path / "notes.txt" / "bench"
    args = ["--teacher", teacher, "--student", student, "--out", out, "--max-images", "8", "--peak-seconds", "0"]
    args += ["--no-progress", "--runs", "2", "--min-round-s", "0", "--batch-sizes", "1"]
    proc = entry("export/benchmark.py", *args)
    assert_one_error(proc, *needles)
    assert "peak" not in proc.stderr and not out.exists()


@pytest.mark.slow
def test_a_config_error_under_a_two_process_launch_is_printed_once(tmp_path):
    """Both ranks meet the error: rank 0 prints it, and the launcher stops rank 1 while it waits its grace period.
    What follows is `accelerate launch`'s own report of a failed worker (torchrun's ChildFailedError and its
    traceback), which no entry can silence; docs/distributed.md says how to read it."""
    import re

    from tests.conftest import launch_args

    out = tmp_path / "o"
    proc = run_cmd(launch_args("ddp.yaml", "train/train.py", TINY_TRAIN, "model.nme=x", f"train.output_dir={out}"))
    assert proc.returncode == 1  # the launcher's exit code for any failed worker
    lines = proc.stderr.splitlines()
    (first,) = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert lines[first : first + 3] == [
        "error: invalid config:",
        "  - model.nme: unknown key; did you mean 'name'?",
        "  fix: edit the YAML or the section.key=value overrides (every key: README.md, 'Config reference')",
    ]
    assert "Traceback" not in "\n".join(lines[: first + 3])
    launcher = "\n".join(lines[first + 3 :])
    assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" in launcher  # only the launcher's own
    root_cause = launcher.split("Root Cause", 1)[1]  # torchrun names the worker that failed first: rank 0, exit 2
    assert re.search(r"rank\s+: 0 \(local_rank: 0\)\n\s+exitcode\s+: 2 ", root_cause), root_cause
    assert not out.exists()
