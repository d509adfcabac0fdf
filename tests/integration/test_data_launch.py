"""Data under a real 2-process launch: an image folder is indexed once per launch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import BIN, ROOT, free_port, run_cmd


def image_folder(root, classes: int, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("validation", 2)):
        for c in range(classes):
            (root / split / f"c{c:03d}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / split / f"c{c:03d}/{i}.png")


@pytest.mark.slow
def test_a_launch_indexes_an_image_folder_once_and_shares_its_errors(tmp_path):
    image_folder(tmp_path / "good", classes=12, per_class=5)
    (tmp_path / "broken" / "train" / "c0").mkdir(parents=True)  # a class folder without an image
    args = [str(BIN / "accelerate"), "launch", "--config_file", "configs/accelerate/ddp.yaml"]
    args += ["--main_process_port", str(free_port()), "tests/integration/index_once_check.py"]
    proc = run_cmd([*args, str(tmp_path / "good"), str(tmp_path / "broken")], env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")), key=str)
    assert [r["rank"] for r in sorted(ranks, key=lambda r: r["rank"])] == [0, 1]
    assert sum(r["scans"] for r in ranks) == 2  # one scan of each folder, in the whole launch
    assert {r["rank"]: r["scans"] for r in ranks} == {0: 2, 1: 0}
    assert ranks[0]["train"] == ranks[1]["train"] == 60 and ranks[0]["val"] == ranks[1]["val"] == 24
    assert ranks[0]["classes"] == ranks[1]["classes"] == [f"c{c:03d}" for c in range(12)]
    assert ranks[0]["paths"] == ranks[1]["paths"]
    assert ranks[0]["error"] == ranks[1]["error"] and "holds no image" in ranks[0]["error"]
