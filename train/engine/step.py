"""One training micro-step: forward under autocast, backward, and on the micro-batch that completes an update, the
divergence check, clipping and the optimizer step.

The divergence check runs before every optimizer update, on every rank: a non-finite loss term in any micro-batch
of the update, or a non-finite gradient this rank holds, raises one flag, and an all-reduce makes every rank see it
(one small collective and one host sync per update). Every rank then stops with the same :class:`DivergenceError`
before the non-finite values reach the weights, so no rank waits in a collective the others left, and nothing is
written under the final checkpoint name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimforge.train.errors import SlimforgeError


class DivergenceError(SlimforgeError):
    """Training produced a non-finite loss or gradient."""


class DivergenceGuard:
    """Watches the loss terms of every micro-batch and the gradients of every update.

    Args:
        states: The run's resumable-state folder (named in the message as the newest good state).
        check_gradients: Also test the gradients. Off under fp16, whose loss scaler skips overflowing updates by
            design (Accelerate's ``optimizer_step_was_skipped``); those skips are bounded instead.
        max_skipped: Consecutive skipped fp16 updates that count as divergence.
    """

    def __init__(self, states: Path, check_gradients: bool = True, max_skipped: int = 20) -> None:
        self.states = states
        self.check_gradients = check_gradients
        self.max_skipped = max_skipped
        self.skipped = 0
        self._bad: dict[str, torch.Tensor] = {}  # loss term -> non-finite in any micro-batch of this update
        self.grad_norm: torch.Tensor | None = None
        """The global gradient norm of the last update, before clipping (logged as ``grad_norm``)."""

    def observe(self, losses: dict[str, torch.Tensor]) -> None:
        """Notes which loss terms of one micro-batch are non-finite, on the device (no host sync)."""
        for k, v in losses.items():
            if k == "logits":
                continue
            bad = ~torch.isfinite(v.detach()).all()
            self._bad[k] = bad if k not in self._bad else self._bad[k] | bad

    def check(self, accelerator, model: nn.Module, step: int) -> None:
        """Before optimizer update ``step`` (1-based): raises on every rank if any rank saw a non-finite value.

        A collective and one host sync per update: every rank calls it once per update.
        """
        device = accelerator.device
        loss_bad = torch.stack(list(self._bad.values())).any() if self._bad else torch.zeros((), dtype=torch.bool)
        grads = [p.grad for p in accelerator.unwrap_model(model).parameters() if p.grad is not None]
        grad_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.grad_norm = None
        if grads:  # DDP / FSDP / one process (DeepSpeed keeps its own, see after_step)
            from torch.distributed.tensor import DTensor

            # FSDP2 holds each rank's shard of every gradient (a DTensor): the norm is the root of the sum over
            # ranks of the shards' squares, one all-reduce (a collective: every FSDP rank has DTensor gradients).
            sharded = any(isinstance(g, DTensor) for g in grads)
            local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
            norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in local])
            if sharded and accelerator.num_processes > 1:
                self.grad_norm = accelerator.reduce(norms.square().sum(), reduction="sum").sqrt()
            else:
                self.grad_norm = torch.linalg.vector_norm(norms)  # before clipping, on the device
            if self.check_gradients:
                grad_bad = ~torch.isfinite(norms).all()
        flag = torch.stack([loss_bad.to(device), grad_bad.to(device)]).float()
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        terms = [k for k, v in self._bad.items() if bool(v)] if bool(flag[0] > 0) else []
        self._bad = {}
        if not bool(flag.any()):  # the host sync
            return
        what = []
        if flag[0] > 0:
            what.append(f"loss term {', '.join(repr(t) for t in terms)}" if terms else "a loss term (on another rank)")
        if flag[1] > 0:
            names = [n for n, p in accelerator.unwrap_model(model).named_parameters()
                     if p.grad is not None and not bool(torch.isfinite(p.grad).all())]  # fmt: skip
            if names:
                what.append(f"the gradient of {names[0]}")
            elif accelerator.num_processes == 1:  # every element finite, a norm overflowed: they are exploding
                what.append("the gradient norm")
            else:
                what.append("a gradient (on another rank)")
        raise DivergenceError(
            f"training diverged at optimizer update {step}: {' and '.join(what)} became non-finite (nan/inf); no "
            f"checkpoint was written; {self._newest_state()}",
            "lower optim.lr (or raise optim.warmup_steps), set optim.grad_clip, use train.mixed_precision=bf16 "
            "rather than fp16, and relaunch",
        )

    def after_step(self, accelerator, model: nn.Module, step: int) -> None:
        """Checks whether the update was skipped. Under fp16 the loss scaler skips overflowing updates by design:
        too many in a row is divergence. Otherwise a skip means the gradients overflowed: DeepSpeed's ZeRO optimizer
        tests its own (partitioned) gradients and silently skips such an update, so the run would go on without
        learning; that is divergence at once."""
        norm = getattr(model, "get_global_grad_norm", None)  # a DeepSpeed engine: its own gradient norm
        if norm is not None and norm() is not None:
            self.grad_norm = torch.as_tensor(norm())
        if not accelerator.optimizer_step_was_skipped:
            self.skipped = 0
            return
        if self.check_gradients:
            raise DivergenceError(
                f"training diverged at optimizer update {step}: the gradients became non-finite (nan/inf) and the "
                f"optimizer skipped the update; no checkpoint was written; {self._newest_state()}",
                "lower optim.lr (or raise optim.warmup_steps), set optim.grad_clip, and relaunch",
            )
        self.skipped += 1
        if self.skipped >= self.max_skipped:
            raise DivergenceError(
                f"training diverged at optimizer update {step}: the fp16 loss scaler skipped {self.skipped} updates "
                f"in a row (every gradient overflowed); {self._newest_state()}",
                "lower optim.lr or use train.mixed_precision=bf16, and relaunch",
            )

    def _newest_state(self) -> str:
        from slimforge.train.state import state_dirs

        found = state_dirs(self.states)
        if not found:
            return "there is no resumable state (train.checkpoint_every saves them)"
        return f"the newest resumable state is {found[-1]} (a relaunch of the same command resumes from it)"


def train_step(
    accelerator,
    model: nn.Module,
    task,
    optimizer,
    batch: dict[str, Any],
    grad_clip: float | None,
    guard: DivergenceGuard,
    step: int,
) -> dict[str, torch.Tensor]:
    """Runs one micro-batch through ``task`` and, when Accelerate says the accumulation window is complete,
    checks for divergence and applies the update.

    Args:
        accelerator: The run's ``Accelerator``.
        model: The prepared (wrapped) student.
        task: ``task(model, batch) -> {"loss", ...}`` (:mod:`slimforge.train.task`).
        optimizer: The prepared optimizer; Accelerate's wrapper skips ``step`` on accumulation micro-steps.
        batch: ``{"pixel_values": [B, C, H, W], "label": [B], "index": [B], "epoch": [B], ...}``.
        grad_clip: Global gradient-norm limit, or None.
        guard: The run's divergence guard.
        step: The optimizer update this micro-batch belongs to (1-based).

    Returns:
        The task's losses (scalars, still on the device: reading them is a sync point).

    Raises:
        DivergenceError: on every rank, before the update, when a loss term or a gradient is non-finite.
    """
    with accelerator.accumulate(model):
        with accelerator.autocast():
            losses = task(model, batch)
        guard.observe(losses)
        accelerator.backward(losses["loss"])
        if accelerator.sync_gradients:
            guard.check(accelerator, model, step)
            if grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if accelerator.sync_gradients:
        guard.after_step(accelerator, model, step)
        if guard.grad_norm is not None:
            losses = {**losses, "grad_norm": guard.grad_norm}
    return losses
