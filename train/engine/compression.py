"""The run's compression steps through their lifecycle: prepare the bare student, step hooks, convert, record.

The engine owns one :class:`RecipeRun`: it checks every step against the launched topology, prepares the bare
student (before ``accelerator.prepare``) with real training images to calibrate on, calls every step's hook after
each optimizer update (and once on resume, so switches like frozen observers follow the restored step), converts
the trained student in place before the final save, and returns the recipe the checkpoint records: the steps the
student was loaded with, then this run's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from slimforge.compress.api import CompressionContext, RecipeError
from slimforge.train.engine.topology import deepspeed_plugin
from slimforge.train.errors import SlimforgeError
from slimforge.train.recipe import build_methods

logger = logging.getLogger(__name__)


def _zero_stage(accelerator) -> int | None:
    plugin = deepspeed_plugin(accelerator)
    return plugin.zero_stage if plugin is not None else None


class RecipeRun:
    """This run's compression steps.

    Args:
        steps: The run config's ``compress`` section.
        loaded: The recipe the student was loaded with (its checkpoint's), kept in front of the new steps.
    """

    def __init__(self, steps: list[dict[str, Any]], loaded: list[dict[str, Any]]) -> None:
        self.methods = build_methods(steps)
        self.loaded = list(loaded)

    def __bool__(self) -> bool:
        return bool(self.methods)

    def check_model(self, model: nn.Module) -> None:
        """Refuses a step that cannot apply to the student (before the process group or any output exists)."""
        for m in self.methods:
            try:
                m.check_model(model)
            except RecipeError as e:
                raise SlimforgeError(f"compress step {m.name!r}: {e.problem}", e.fix) from None

    def check_topology(self, accelerator) -> None:
        """Refuses a step the launched topology cannot run (before any output exists)."""
        weights = "float32"  # DeepSpeed's fp16 mode holds the module (weights and buffers) in fp16; bf16 is autocast
        if _zero_stage(accelerator) is not None and str(accelerator.mixed_precision) == "fp16":
            weights = "float16"
        for m in self.methods:
            why = m.check_topology(str(accelerator.distributed_type), _zero_stage(accelerator), weights)
            if why:
                raise SlimforgeError(
                    f"compress step {m.name!r} cannot run under {accelerator.distributed_type}"
                    f"{f' ZeRO-{_zero_stage(accelerator)}' if _zero_stage(accelerator) else ''}: {why}",
                    "launch it with configs/accelerate/ddp.yaml, zero1.yaml or zero2.yaml",
                )

    def prepare(
        self, model: nn.Module, example: torch.Tensor, batches, device, teacher, total_steps: int | None = None
    ) -> nn.Module:
        """Applies every step's ``prepare`` to the bare student and returns it.

        Args:
            model: The bare student.
            example: ``[1, C, H, W]``.
            batches: ``n -> iterator`` of ``[B, C, H, W]`` training images (evaluation transform, same on every rank).
            device: The rank's device.
            teacher: The frozen teacher, or None.
            total_steps: The run's number of optimizer updates (schedules that end with the run), or None.
        """
        ctx = CompressionContext(
            example_input=example, device=device, batches=batches, teacher=teacher, total_steps=total_steps
        )
        for m in self.methods:
            try:
                model = m.prepare(model, ctx)
            except RecipeError as e:
                raise SlimforgeError(f"compress step {m.name!r}: {e.problem}", e.fix) from None
        return model

    def on_step(self, model: nn.Module, step: int) -> None:
        for m in self.methods:
            m.on_step(model, step)

    def convert(self, model: nn.Module) -> None:
        for m in self.methods:
            m.convert(model)

    def recipe(self) -> list[dict[str, Any]]:
        """What the checkpoint records: the loaded steps, then this run's (with their records)."""
        return self.loaded + [m.step_record() for m in self.methods]


def calibration_batches(dataset, data_cfg) -> Any:
    """``n -> iterator`` over batches of a seeded, class-stratified sample of ``n`` images of ``dataset``
    (evaluation transform; :func:`slimforge.train.sampling.stratified_indices` with ``data.seed``): the same images
    on every rank, whatever the micro-batch size, and every class once ``n`` reaches the class count."""
    import dataclasses

    from slimforge.train.data import build_loader
    from slimforge.train.sampling import class_coverage, stratified_indices

    # Batches of the training micro-batch size, read in this process: a few batches do not pay for workers.
    cfg = dataclasses.replace(data_cfg, eval_batch_size=data_cfg.batch_size, num_workers=0)

    def batches(n: int) -> Iterator[torch.Tensor]:
        left = n
        sample = dataset.select(stratified_indices(dataset["label"], n, data_cfg.seed))
        logger.info("calibration sample: %s", class_coverage(sample["label"]))
        for batch in build_loader(sample, cfg, is_training=False):
            images = batch["pixel_values"][:left]
            left -= len(images)
            yield images
            if left <= 0:
                return

    return batches
