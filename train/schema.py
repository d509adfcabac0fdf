"""The run config both entries read: one section per component, each validated by its own dataclass.

Every section's dataclass lives beside the component that reads it (``DataConfig`` in ``data.py``, ``LossConfig``
in ``losses.py`` ...); the loop's own section, :class:`TrainConfig`, lives here, since the engine that reads it
imports this module and not the other way round.

Example:
    >>> from slimforge.train.config import load_config
    >>> from slimforge.train.schema import RunConfig
    >>> cfg = load_config(RunConfig, "configs/debug/tiny_distill.yaml", ["train.epochs=1"])
    >>> cfg.train.epochs
    1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from slimforge.train.config import at_least
from slimforge.train.data import DataConfig
from slimforge.train.losses import LossConfig
from slimforge.train.models import ModelConfig
from slimforge.train.optim import OptimConfig
from slimforge.train.placement import Placement, TeacherDtype
from slimforge.train.teacher_cache import CacheConfig


@dataclass
class TrainConfig:
    """The loop, its outputs and its numerics."""

    output_dir: str = "runs/run"
    """Run folder: resolved config, metrics.jsonl, TensorBoard logs and the final ``checkpoint/``."""
    epochs: int = 10
    seed: int = 42
    """Seeds model init, shuffling and augmentation (the same on every rank; Accelerate shards the batches)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision: bf16 on CPU or GPU, fp16 on GPU only; weights and optimizer stay fp32 (under DeepSpeed,
    bf16 is its torch_autocast, and fp16 its fp16 mode: fp16 weights with fp32 masters)."""
    log_every: int = 20
    """Log train loss/LR every N optimizer steps."""
    overwrite: bool = False
    """Allow replacing a finished run in ``output_dir``; otherwise an existing checkpoint there is an error."""
    tensorboard: bool = True
    """Also log metrics to TensorBoard (``output_dir/tensorboard``)."""
    record_samples: bool = False
    """Write the dataset indices each rank trained on to ``output_dir/ranks/`` (checks data sharding)."""
    cpu: bool = False
    """Train on CPU even when a GPU is present."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer update; global batch = batch_size × processes × this.
    Under DeepSpeed it must equal the launch config's ``gradient_accumulation_steps``."""
    max_steps: int | None = None
    """Stop after this many optimizer updates (the LR schedule still spans ``epochs``); null runs all epochs."""
    checkpoint_every: int | None = None
    """Save the full resumable training state every N optimizer updates (and at every epoch end) under
    ``output_dir/state/``; null saves none. A relaunch of the same command resumes from the newest one."""
    keep_states: int = 2
    """How many resumable states to keep."""
    resume: bool = True
    """Resume from the newest complete state in ``output_dir/state/`` if there is one, provided it was saved by a
    run of the same settings (otherwise the run stops, naming the changed fields). false starts afresh and deletes
    the old states (so does ``overwrite: true``)."""
    collective_timeout_s: int = 1800
    """How long a rank waits in a collective (all-reduce, barrier ...) for the others before the run fails with a
    timeout error, in seconds (torch's ``init_process_group`` timeout). Raise it for slow shared filesystems or
    long evaluation on rank 0; lower it to make a hung node fail sooner."""
    teacher_placement: Placement = "replicated"
    """replicated: a full frozen copy of the teacher on every rank, outside any DDP/DeepSpeed/FSDP wrapper
    (memory per rank = teacher weights + activations of one micro-batch; no communication). sharded: the
    teacher's weights split across the ranks with FSDP2 for inference (1/world of them per rank, plus the
    layers being gathered; an all-gather of the teacher per micro-batch); needs >= 2 processes. cached: the
    teacher's outputs read from the cache train/cache_teacher.py wrote (``cache`` section): no teacher forward.
    See train/placement.py."""

    teacher_dtype: TeacherDtype = "fp32"
    """bf16: the teacher computes in bf16 (replicated: bf16 weights, half the memory; sharded: bf16 all-gathers,
    half the communication); its logits are upcast to fp32 by the KD loss. fp32: as trained."""
    compile_teacher: bool = False
    """``torch.compile`` the frozen teacher (replicated placement): its forward is most of a distillation step's
    cost on GPUs. The first steps compile (minutes on large models)."""
    compile_student: bool = False
    """``torch.compile`` the student through Accelerate (inductor, applied in ``accelerator.prepare``, so it wraps
    DDP/DeepSpeed/FSDP the way Accelerate supports)."""
    channels_last: bool = False
    """Student and teacher weights and the training images in channels_last (NHWC): faster convolutions on
    tensor-core GPUs (and often on CPUs with oneDNN)."""
    cudnn_benchmark: bool = False
    """``torch.backends.cudnn.benchmark``: cuDNN times its algorithms for each new input shape and keeps the
    fastest (fixed image sizes only; the first steps are slower)."""

    cpu_threads: int | None = None
    """Intra-op threads per process of a CPU run (a GPU run keeps torch's default). null: the user's
    ``OMP_NUM_THREADS`` if they set one, else usable cores ÷ processes on this machine (``accelerate launch``'s own
    ``OMP_NUM_THREADS=1`` is not the user's and is replaced); an int: exactly that many. The log and
    ``summary.json`` (``topology.ranks``) give each rank's count and the rule that chose it."""

    def validate(self) -> list[str]:
        p = at_least(self, 1, "epochs", "grad_accum_steps", "keep_states", "log_every", "max_steps", "checkpoint_every")
        p += at_least(self, 1, "cpu_threads")
        p += at_least(self, 10, "collective_timeout_s")
        if self.compile_teacher and self.teacher_placement == "sharded":
            p.append(
                "compile_teacher: compiles a replicated teacher; a sharded (FSDP2) teacher runs uncompiled: set "
                "teacher_placement=replicated or compile_teacher=false"
            )
        if not self.output_dir:
            p.append("output_dir: must be a folder path")
        return p


@dataclass
class RunConfig:
    """A training or distillation run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model being trained (the student, under distill.py)."""
    teacher: ModelConfig | None = None
    """distill.py only: the frozen teacher, usually ``{checkpoint: runs/teacher/checkpoint}``."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The cached teacher (``train.teacher_placement=cached``, train/cache_teacher.py)."""
    compress: list[dict[str, Any]] = field(default_factory=list)
    """Compression recipe steps ``[{method: <name>, <option>: <value>}, ...]`` applied to the bare student before
    training (methods: ``slimforge.compress.api.method_names()``; options: each method's ``XxxConfig``). A student
    loaded from a checkpoint keeps its recorded steps; these are appended."""

    def validate(self) -> list[str]:
        from slimforge.train.recipe import step_problems

        p = [f"compress{p}" for p in step_problems(self.compress)]
        if self.train.teacher_placement == "cached" and self.loss.task == "hint":
            p.append(
                "loss.task: hint matches the teacher's intermediate features, which a cache does not hold: use "
                "train.teacher_placement=replicated or sharded, or loss.task=kd"
            )
        if self.train.teacher_placement == "cached" and self.train.compile_teacher:
            p.append("train.compile_teacher: a cached teacher does not run: set compile_teacher=false")
        return p
