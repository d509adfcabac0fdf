"""Divergence stops the run: under 1 process, DDP and DeepSpeed ZeRO-2, a non-finite loss or gradient stops every
rank before the update that would write it into the weights, with one message and no final checkpoint; a
checkpoint that holds non-finite values is refused by name wherever it is loaded."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimforge.export.export import main as export_main
from slimforge.train.checkpoint import load_checkpoint, save_checkpoint
from slimforge.train.errors import CheckpointError
from tests.conftest import make_checkpoint
from tests.integration.test_distributed import distill_tiny, distill_tiny_here, tiny_teacher  # noqa: F401  (fixture)


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", ["single.yaml", "ddp.yaml", "zero2.yaml"])
def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path, tiny_teacher, launch_config, capsys):  # noqa: F811
    out = tmp_path / "run"
    args = ("optim.lr=1e6", "train.log_every=1", "train.max_steps=40")
    if launch_config == "single.yaml":  # one process: in this one
        capsys.readouterr()
        assert distill_tiny_here(tiny_teacher, out, "data.batch_size=32", *args) == 2
        err = capsys.readouterr().err
    else:
        proc = distill_tiny(launch_config, tiny_teacher, out, "data.batch_size=16", *args, timeout=300)
        assert proc.returncode != 0
        err = proc.stderr
    assert err.count("error: training diverged at optimizer update") == 1, err[-3000:]
    assert "fix: lower optim.lr" in err and "no checkpoint was written" in err
    assert not (out / "checkpoint").exists() and not (out / "summary.json").exists()
    stopped = int(err.split("diverged at optimizer update ")[1].split(":")[0])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["split"] == "train"]
    # Every logged update was finite, and the run stopped at the very next one: the first non-finite loss.
    assert all(math.isfinite(r["loss"]) for r in train) and train[-1]["step"] == stopped - 1


def test_a_non_finite_checkpoint_is_refused_by_name(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ok")
    model, spec, meta = load_checkpoint(ckpt)
    state = model.state_dict()
    state["fc.weight"][0, 0] = float("nan")
    bad = save_checkpoint(state, spec, tmp_path / "nan", extra=meta["extra"])
    with pytest.raises(CheckpointError, match=r"holds non-finite values \(nan/inf\) in fc.weight"):
        load_checkpoint(bad)
    code = export_main(["--checkpoint", str(bad), "--out", str(tmp_path / "export")])
    err = capsys.readouterr().err
    assert code == 2 and "holds non-finite values" in err and "fc.weight" in err and "Traceback" not in err
    assert not (tmp_path / "export").exists()
    assert torch.isfinite(load_checkpoint(ckpt)[0].fc.weight).all()
