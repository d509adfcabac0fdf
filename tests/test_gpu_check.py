"""scripts/gpu_check.sh and scripts/gpu_wheels.py: without a GPU the check stops at once with its own exit status;
every item's command is one this repository accepts (checked by the dry run, without launching it); the wheelhouse
carries exactly what the GPU image lacks, and every module the items import is either in the image or carried."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import shutil
import time

import pytest

from slimforge.train.config import load_config
from slimforge.train.schema import RunConfig
from tests.conftest import BIN, GPU_NODE, ROOT, run_cmd


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_stops_at_once_with_its_no_gpu_status(tmp_path):
    if GPU_NODE or shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA driver: the script would run its checks")
    start = time.perf_counter()
    proc = run_cmd(["bash", "scripts/gpu_check.sh", str(tmp_path / "x")], timeout=60)
    assert proc.returncode == script("gpu_check").NO_GPU == 3 and time.perf_counter() - start < 10
    assert "no NVIDIA GPU on this machine" in proc.stderr and not (tmp_path / "x").exists()
    # The Python driver refuses the same way where the shell check is bypassed.
    proc = run_cmd([str(BIN / "python"), "scripts/gpu_check.py", "--out", str(tmp_path / "y")])
    assert proc.returncode == 3 and "no CUDA GPU is visible" in proc.stderr and not (tmp_path / "y").exists()
    for args in ([], ["--bogus"], ["--prepare", "x"], ["--dry-run"], ["a", "b"]):
        assert run_cmd(["bash", "scripts/gpu_check.sh", *args]).returncode == 2, args


@pytest.mark.parametrize("gpus", [1, 2])
def test_every_training_item_is_a_valid_launch(tmp_path, gpus):
    plan = script("gpu_check").Plan(tmp_path, gpus)
    items = plan.launches
    assert list(items)[:1] == ["teacher"] and {"ddp_bf16", "ddp_fp16", "zero2_bf16", "zero3_bf16", "qat"} <= set(items)
    assert (items["sharded_teacher"] is None) == (items["two_ranks"] is None) == (gpus == 1)
    for name, cmd in items.items():
        if cmd is None:
            continue
        launch_config = ROOT / cmd[cmd.index("--config_file") + 1]
        entry = cmd[cmd.index("--config") - 1]
        run_config = cmd[cmd.index("--config") + 1]
        overrides = cmd[cmd.index("--config") + 2 :]
        assert launch_config.is_file() and (ROOT / entry).is_file(), name
        cfg = load_config(RunConfig, ROOT / run_config, overrides)  # raises on an unknown or invalid override
        assert cfg.train.output_dir.startswith(str(tmp_path / "runs")), name


def test_the_dry_run_checks_every_item_without_a_gpu(tmp_path):
    """What the GPU machine would run, set up here: launches validated, entries and the GPU test tier started."""
    proc = run_cmd([str(BIN / "python"), "scripts/gpu_check.py", "--out", str(tmp_path), "--dry-run"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "every item is ready" in proc.stdout and "sharded_teacher:" in proc.stdout
    # A broken override is caught by the same dry run.
    gpu_check = script("gpu_check")
    plan = gpu_check.Plan(tmp_path, 2)
    plan.launches["qat"] = [*plan.launches["qat"], "train.no_such_key=1"]
    problems = gpu_check.dry_run(plan)
    assert any(p.startswith("qat:") and "no_such_key" in p for p in problems), problems


def installed(name: str, spec: str):
    """``fetch`` for :func:`walk` from this environment's installed metadata: no download."""
    wheels = script("gpu_wheels")
    return wheels.Fetched(md.version(name), md.requires(name) or [], {})


def test_the_wheelhouse_carries_what_the_image_lacks_and_every_gpu_module_is_covered():
    wheels = script("gpu_wheels")
    image, python = wheels.read_image()
    assert python == "3.12" and image["torch"] and image["onnxruntime"] and "datasets" not in image
    decided = wheels.walk(image, python, installed)
    carried = {e["name"] for e in decided["wheels"]}
    assert {"datasets", "mlxtend", "torch-pruning", "deepspeed"} <= carried
    assert not carried & set(wheels.PROTECTED) and not carried & {n for n, v in image.items() if v}
    assert [e["name"] for e in decided["left_out"]] == ["onnxruntime-gpu"]
    # Every module an item imports comes from the image or from the wheelhouse.
    owners = md.packages_distributions()
    for module in wheels.GPU_MODULES:
        top = module.split(".")[0]
        if top == "slimforge":
            continue  # installed from this checkout
        # onnxruntime-gpu here and the image's onnxruntime ship the same module
        dists = {wheels.canon(d).replace("onnxruntime-gpu", "onnxruntime") for d in owners[top]}
        assert dists & (set(image) | carried), f"{module}: {dists} is neither in the image nor carried"
    # A prepared wheelhouse (ignored by git; bash scripts/gpu_check.sh --prepare) matches the list and its cap.
    manifest_path = ROOT / ".gpu_wheels" / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        assert {e["name"] for e in manifest["wheels"]} == carried
        assert manifest["total_bytes"] <= wheels.MAX_BYTES
        for e in manifest["wheels"]:
            assert (manifest_path.parent / e["file"]).stat().st_size == e["bytes"]


def test_an_image_package_at_an_unknown_or_too_old_version_travels_as_a_fallback():
    wheels = script("gpu_wheels")
    image, python = wheels.read_image()
    image = {**image, "timm": None, "accelerate": "1.0.0"}  # timm: unknown version; accelerate below slimforge's floor
    decided = wheels.walk(image, python, installed)
    by_name = {e["name"]: e for e in decided["wheels"]}
    assert by_name["timm"]["install_if"] and by_name["accelerate"]["install_if"].startswith(("<", ">"))
    # There, a fallback is installed only where the image's real version misses the bound.
    chosen, kept = wheels.choose(list(by_name.values()), {"timm": "1.0.29", "accelerate": "1.0.0"})
    names = {e["name"] for e in chosen}
    assert "timm" not in names and "accelerate" in names and "datasets" in names and kept == ["timm 1.0.29"]
    chosen, _ = wheels.choose(list(by_name.values()), {})  # absent: installed
    assert "timm" in {e["name"] for e in chosen}
