"""Every YAML shipped in configs/ loads, and starts with a comment holding the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slimforge.train.config import load_config
from slimforge.train.schema import RunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
RUN_CONFIGS = [p for p in ALL if p.parent.name in ("train", "distill", "debug")]


def test_configs_exist():
    assert RUN_CONFIGS and any(p.parent.name == "accelerate" for p in ALL)


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_first_line_is_the_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and str(path.relative_to(CONFIGS.parent)) in first


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_run_config_loads(path):
    cfg = load_config(RunConfig, path)
    if path.parent.name == "distill":
        assert cfg.teacher is not None and cfg.teacher.checkpoint


@pytest.mark.parametrize("path", [p for p in ALL if p.parent.name == "accelerate"], ids=lambda p: p.name)
def test_accelerate_config_is_a_launcher_config(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP")
    assert data["num_processes"] >= 1


def test_readme_config_reference_lists_every_key():
    """The README's config table names every field of every section's dataclass (and no removed one)."""
    import dataclasses
    import re
    import typing

    readme = (CONFIGS.parent / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        m = re.match(r"\| `(\w+)`(?:, `(\w+)`)? \| `[^`]+` \| (.*) \|$", line)
        if m:
            keys = set(re.findall(r"(?:^|, )`(\w+)`", m.group(3)))
            rows[m.group(1)] = keys
    hints = typing.get_type_hints(RunConfig)
    for section in ("model", "data", "optim", "loss", "train"):
        cls = hints[section]
        cls = next((a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)), cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        assert section in rows, f"README config reference has no row for {section}"
        assert rows[section] == fields, f"{section}: README lists {sorted(rows[section] ^ fields)} wrongly"
    from slimforge.compress.api import method_class, method_names

    for name in method_names():  # every registered compression method has its row, with exactly its options
        fields = {f.name for f in dataclasses.fields(method_class(name).config_class)}
        assert name in rows, f"README has no row for compression method {name}"
        assert rows[name] == fields, f"{name}: README lists {sorted(rows[name] ^ fields)} wrongly"
