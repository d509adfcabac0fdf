"""Shared fixtures: the repo root, a subprocess runner for entries, tiny checkpoints on real data.

Two tiers. The default run is the CPU tier: it hides any GPU from itself and from every process it starts
(``CUDA_VISIBLE_DEVICES=""``), because its figures assume the CPU (``MULTI_CPU`` launches, two processes on one
device, 1e-5 equivalence that TF32 would break). ``pytest -m gpu`` runs the GPU tier (``tests/gpu/``) with the
GPUs visible; elsewhere those tests are skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GPU_NODE = Path("/dev/nvidiactl").exists()
"""This machine has an NVIDIA driver (whether or not the tier hides its GPUs)."""


def _gpu_tier(config) -> bool:
    expr = (config.getoption("markexpr") or "").replace("(", " ").replace(")", " ").split()
    return "gpu" in expr and "not" not in expr


def pytest_configure(config):
    if not _gpu_tier(config):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA; inherited by launched processes


def pytest_collection_modifyitems(config, items):
    import torch

    if not _gpu_tier(config):
        reason = "GPU tier: run it with `pytest -m gpu` on a machine with a CUDA GPU (this run is the CPU tier)"
    elif not torch.cuda.is_available():
        reason = "GPU tier: no CUDA GPU is visible on this machine"
    else:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def run_cmd(args: list[str], cwd: Path = ROOT, timeout: int = 600, env: dict | None = None):
    """Runs a command the way a user would (fresh process) and returns the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    full_env.update(env or {})
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def free_port() -> int:
    """A TCP port nothing listens on now: each launch gets its own rendezvous port, so concurrent test runs
    (or a user's training on 29500) do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_args(launch_config: str, entry: str, config: str, *overrides: str, launcher: tuple = ()) -> list[str]:
    """The `accelerate launch` command line a user types, with ``configs/accelerate/<launch_config>``.

    ``launcher``: `accelerate launch` options (e.g. a node's rank and rendezvous) used instead of the default
    ``--main_process_port <free port>``."""
    return [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        f"configs/accelerate/{launch_config}",
        *(launcher or ("--main_process_port", str(free_port()))),
        entry,
        "--config",
        config,
        *overrides,
    ]


def distill_here(config: str, *overrides: str) -> int:
    """``train/distill.py``'s ``main`` in this process, returning its exit code: the single-process run that
    ``configs/accelerate/single.yaml`` launches (the same weights, bit for bit), without the launcher's and the
    imports' ~10 s. References and one-process checks use it; whatever runs on several processes is launched."""
    from slimforge.train import distill

    return distill.main(["--config", str(ROOT / config), *overrides])


def tiny_data_config(**overrides):
    from slimforge.train.data import DataConfig

    base = dict(
        source="embedded",
        name="mnist_5k",
        in_chans=1,
        image_size=32,
        num_workers=0,
        max_train_samples=256,
        max_val_samples=128,
    )
    base.update(overrides)
    return DataConfig(**base)


DIGITS = [str(i) for i in range(10)]
"""The class names of the embedded datasets (mnist_5k, digits)."""


def make_checkpoint(
    path: Path,
    name: str = "resnet10t",
    data=None,
    kwargs: dict | None = None,
    seed: int = 0,
    class_names: list[str] | None = None,
    source: str = "timm",
):
    """A randomly initialised, real checkpoint of ``source`` model ``name`` for ``data`` (default: tiny MNIST) with
    10 classes named ``class_names`` (default: the embedded datasets' ``"0"`` ... ``"9"``)."""
    import torch

    from slimforge.train.checkpoint import save_checkpoint
    from slimforge.train.data import describe
    from slimforge.train.models import ModelConfig, build_model

    data = data or tiny_data_config()
    torch.manual_seed(seed)
    info = describe(data)
    names = DIGITS if class_names is None else class_names
    model, spec = build_model(
        ModelConfig(source=source, name=name, kwargs=kwargs or {}), 10, info["input_size"], info, names
    )
    save_checkpoint(model.state_dict(), spec, path, extra={"data": dataclasses.asdict(data)})
    return path


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("teacher") / "checkpoint", name="resnet10t")


def train_checkpoint(path: Path, name: str = "resnet10t", steps: int = 120, seed: int = 0, data=None) -> Path:
    """A *trained* checkpoint of timm ``name`` on the embedded MNIST (a plain AdamW loop, ~``steps`` updates of 32
    images): its logits have real margins, unlike a random init, so int8 checks can be asked to agree."""
    import torch
    import torch.nn.functional as F

    from slimforge.train.checkpoint import save_checkpoint
    from slimforge.train.data import build_loader, describe, load_splits
    from slimforge.train.models import ModelConfig, build_model

    data = data or tiny_data_config(max_train_samples=1024, batch_size=32, augment=False)
    torch.manual_seed(seed)
    info = describe(data)
    splits = load_splits(data)
    model, spec = build_model(ModelConfig(name=name), splits.num_classes, info["input_size"], info, splits.class_names)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    done = 0
    while done < steps:
        for batch in build_loader(splits.train, data, is_training=True, seed=seed):
            loss = F.cross_entropy(model(batch["pixel_values"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    save_checkpoint(model.eval().state_dict(), spec, path, extra={"data": dataclasses.asdict(data)})
    return path


@pytest.fixture(scope="session")
def trained_resnet(tmp_path_factory) -> Path:
    """resnet10t trained for 120 updates on embedded MNIST (about 86% validation accuracy)."""
    return train_checkpoint(tmp_path_factory.mktemp("trained") / "resnet10t", "resnet10t")


def compress_checkpoint(source, path, steps: list[dict], updates: int = 6, images=None):
    """``source`` with recipe ``steps`` applied through the methods' hooks, as the engine drives them (QAT: a few
    updates on real training images, or on ``images`` ``[N, C, H, W]``), converted and saved. Returns the saved
    checkpoint's path and the model as saved (eval mode)."""
    import torch

    from slimforge.compress.api import CompressionContext
    from slimforge.export.evaldata import ValidationSet, data_config_from_meta
    from slimforge.train.checkpoint import load_checkpoint, save_checkpoint
    from slimforge.train.recipe import build_methods

    model, spec, meta = load_checkpoint(source)
    if images is None:
        images = ValidationSet(data_config_from_meta(meta), 64, split="train").images_for(spec)
    batches = list(images.split(16))
    methods = build_methods(steps)
    ctx = CompressionContext(example_input=images[:1], batches=lambda n: iter(images[:n].split(16)))
    for m in methods:
        model = m.prepare(model, ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    for step in range(1, updates + 1):
        model(batches[step % len(batches)]).logsumexp(1).mean().backward()  # any loss: the point is the structure
        optimizer.step()
        optimizer.zero_grad()
        for m in methods:
            m.on_step(model, step)
    for m in methods:
        m.convert(model)
    spec.recipe = spec.recipe + [m.step_record() for m in methods]
    return save_checkpoint(model.eval().state_dict(), spec, path, extra=meta["extra"]), model


def fresh_process_logits(checkpoint, images, folder: Path):
    """The logits a fresh Python process computes for ``images`` with ``checkpoint`` rebuilt from disk alone, and the
    recipe methods it read: ``(logits [N, K], ["lowrank", "qat", ...])``."""
    import json
    import sys

    import torch

    torch.save(images, folder / "images.pt")
    code = (
        "import json, torch\n"
        "from slimforge.train.checkpoint import load_checkpoint\n"
        f"model, spec, _ = load_checkpoint({str(checkpoint)!r})\n"
        f"images = torch.load({str(folder / 'images.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    logits = model.eval()(images).tolist()\n"
        "print(json.dumps({'logits': logits, 'recipe': [s['method'] for s in spec.recipe]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    return torch.tensor(fresh["logits"]), fresh["recipe"]
