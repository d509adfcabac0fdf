"""What the loop reports while it runs: ``metrics.jsonl`` (+ trackers) and the training throughput."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process) and mirrors scalars to trackers."""

    def __init__(self, path: Path, accelerator) -> None:
        self.path = path
        self.accelerator = accelerator

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        self.accelerator.log(scalars, step=step)


class ComputeDtypeProbe:
    """The dtype the student's first convolution or matmul really computed in, in its first training forward.

    The model's *outputs* do not tell: Accelerate converts a mixed-precision model's outputs back to fp32. A
    dispatch mode entered around the bare student's first forward sees every operation after autocast has cast its
    inputs, whichever modules the student is built from (plain layers or fake-quantised ones); it removes itself
    after that forward.

    Args:
        model: The bare (unwrapped) student.
    """

    _OPS = ("aten.convolution.default", "aten.mm.default", "aten.addmm.default", "aten.bmm.default")

    def __init__(self, model: nn.Module) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        probe = self

        class _FirstMatmul(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if probe.dtype is None and str(func) in ComputeDtypeProbe._OPS and isinstance(out, torch.Tensor):
                    probe.dtype = str(out.dtype)
                return out

        self.dtype: str | None = None
        self._mode = _FirstMatmul()
        self._handles = [
            model.register_forward_pre_hook(lambda m, args: self._enter()),
            model.register_forward_hook(lambda m, args, out: self._exit()),
        ]

    def _enter(self) -> None:  # a pre-hook that returned something would replace the forward's inputs
        self._mode.__enter__()

    def _exit(self) -> None:
        self._mode.__exit__(None, None, None)
        for h in self._handles:
            h.remove()


class ThroughputMeter:
    """Images per second of the whole run and of its steady state.

    The steady state runs from the ``warm_steps``-th optimizer update to the last one, so it excludes the first
    updates (allocator growth, thread pools, cuDNN autotuning). On a GPU each update's end waits for the device
    (``torch.cuda.synchronize``) before the clock is read, so queued kernels are not counted as done.

    Besides images/s (which includes waiting for the data loader), it times the steps themselves: from a batch in
    hand to its update done (forward, loss, backward, optimizer; the teacher's forward or the cache lookup when
    distilling), so a step's cost can be compared between tasks even where the loader limits the images/s.

    Args:
        warm_steps: The update after which the steady-state clock starts.
        sync: Synchronise the CUDA device before reading the clock.
    """

    def __init__(self, warm_steps: int = 3, sync: bool = False) -> None:
        self.warm_steps = warm_steps
        self.sync = sync
        self.start = time.perf_counter()
        self.images = 0
        self._last = (self.start, 0)
        self._steady: tuple[float, int] | None = None
        self._pending = 0.0  # step seconds of the update in progress (its micro-batches)
        self._step_seconds = 0.0
        self._step_updates = 0

    def step_done(self, start: float) -> None:
        """Adds the time since ``start`` (``time.perf_counter()`` when the micro-batch was in hand) to the update
        in progress."""
        if self.sync:
            torch.cuda.synchronize()
        self._pending += time.perf_counter() - start

    def count(self, images: int) -> None:
        """Adds ``images`` processed by all ranks together (micro-batch × processes)."""
        self.images += images

    def update_done(self, step: int) -> None:
        """Marks the end of optimizer update ``step``."""
        if self.sync:
            torch.cuda.synchronize()
        self._last = (time.perf_counter(), self.images)
        if step == self.warm_steps:
            self._steady = self._last
        elif self._steady is not None:
            self._step_seconds += self._pending
            self._step_updates += 1
        self._pending = 0.0

    def summary(self) -> dict[str, Any]:
        """``train_seconds``, ``train_images_per_second``, ``steady_images_per_second`` and ``steady_step_ms`` (the
        last two None if too short)."""
        elapsed = time.perf_counter() - self.start
        steady = None
        if self._steady is not None and self._last[0] > self._steady[0]:
            steady = round((self._last[1] - self._steady[1]) / (self._last[0] - self._steady[0]), 1)
        return {
            "train_seconds": round(elapsed, 2),
            "train_images_per_second": round(self.images / elapsed, 1),
            # Training updates only (no evaluation, no checkpointing), from the warm-up update to the last.
            "steady_images_per_second": steady,
            # The same updates' own compute, without the time spent waiting for batches.
            "steady_step_ms": round(1e3 * self._step_seconds / self._step_updates, 2) if self._step_updates else None,
        }
