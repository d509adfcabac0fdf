"""Config schema: unknown keys, wrong types and impossible values are all reported at once, with the fix."""

from __future__ import annotations

import pytest
import yaml

from slimforge.train.config import apply_overrides, from_dict, load_config
from slimforge.train.errors import ConfigError, SlimforgeError
from slimforge.train.schema import RunConfig


def test_defaults_are_valid():
    cfg = from_dict(RunConfig, {"model": {"name": "resnet18"}})
    assert cfg.model.name == "resnet18" and cfg.data.source == "embedded" and cfg.teacher is None


def test_every_problem_is_reported_in_one_error():
    data = {
        "model": {"name": "resnet18", "nme": "x"},  # unknown key (typo)
        "data": {"batch_size": "big", "val_fraction": 1.5, "in_chans": 2},  # wrong type, impossible values
        "optim": {"lr": -1.0},
        "trian": {},  # unknown section
    }
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, data)
    text = str(info.value)
    assert "model.nme: unknown key; did you mean 'name'?" in text
    assert "data.batch_size: expected int, got str 'big'" in text
    assert "data.val_fraction: 1.5 must be in (0, 1)" in text
    assert "data.in_chans: 2 must be 1 (grayscale) or 3 (RGB)" in text
    assert "optim.lr: -1.0 must be > 0" in text
    assert "trian: unknown key; did you mean 'train'?" in text
    assert "fix:" in text
    assert len(info.value.problems) == 6


def test_literal_and_bool_types_are_strict():
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, {"model": {"name": "r"}, "train": {"mixed_precision": "bf61", "overwrite": "yes"}})
    text = str(info.value)
    assert "train.mixed_precision: 'bf61' is not one of 'no', 'bf16', 'fp16' (did you mean 'bf16'?)" in text
    assert "train.overwrite: expected bool, got str 'yes'" in text


def test_a_bare_no_reads_as_the_option_no(tmp_path):
    """YAML 1.1 reads ``mixed_precision: no`` (and the override ``train.mixed_precision=no``) as False; the option
    the user wrote is 'no'. Other values of the wrong kind stay errors."""
    cfg = load_config(RunConfig, None, ["model.name=r", "train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision: True is not one of"):
        from_dict(RunConfig, {"model": {"name": "r"}, "train": {"mixed_precision": True}})


def test_yaml_scientific_notation_is_accepted_for_floats_only():
    cfg = from_dict(RunConfig, {"model": {"name": "r"}, "optim": {"lr": "1e-3"}})
    assert cfg.optim.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        from_dict(RunConfig, {"model": {"name": "r"}, "train": {"epochs": "1e1"}})


def test_overrides_are_typed_as_yaml_and_create_sections():
    data = apply_overrides({}, ["optim.lr=0.01", "train.epochs=3", "teacher.checkpoint=runs/t", "data.mean=[0.5]"])
    assert data == {
        "optim": {"lr": 0.01},
        "train": {"epochs": 3},
        "teacher": {"checkpoint": "runs/t"},
        "data": {"mean": [0.5]},
    }
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["optim.lr"])


def test_load_config_applies_overrides_over_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "resnet18"}, "train": {"epochs": 5}}))
    cfg = load_config(RunConfig, path, ["train.epochs=2", "model.kwargs={drop_rate: 0.1}"])
    assert cfg.train.epochs == 2 and cfg.model.kwargs == {"drop_rate": 0.1}


def test_missing_and_non_mapping_files_are_clear_errors(tmp_path):
    with pytest.raises(SlimforgeError, match="does not exist"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(SlimforgeError, match="must hold a mapping"):
        load_config(RunConfig, bad)


def test_yaml_tags_are_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(SlimforgeError, match="not valid YAML"):
        load_config(RunConfig, evil)


def test_unknown_compression_method_is_a_config_error():
    with pytest.raises(ConfigError, match=r"compress\[0\].method: unknown compression method 'magic'"):
        from_dict(RunConfig, {"model": {"name": "r"}, "compress": [{"method": "magic"}]})


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "model.name=!!python/object/apply:os.system ['echo hi']",
            "tag !!python/object/apply:os.system is not allowed",
        ),
        ("model.kwargs=!!python/name:os.system", "tag !!python/name:os.system is not allowed"),
        ("compress=[{method: qat", "expected ',' or '}', but got '<stream end>' at character 14"),
        ("model.name=a: b: c", "mapping values are not allowed here"),
    ],
    ids=["python_object_tag", "python_name_tag", "unclosed_list", "colon_in_text"],
)
def test_an_override_that_is_not_plain_yaml_is_a_config_error(override, needle):
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, ["optim.lr=0.1", override])
    (problem,) = info.value.problems
    assert problem.startswith(f"override {override!r}: the value is not plain YAML") and needle in problem
    assert "plain YAML value" in info.value.fix
