"""The benchmark's options: what to run, on which runtimes, how much to measure."""

from __future__ import annotations

from dataclasses import dataclass, field

from slimforge.export.measure import TimingConfig
from slimforge.export.runtimes import available_runtimes
from slimforge.train.config import at_least

TEACHER_RUNTIME = "torch-eager"
GPU_TEACHER_RUNTIME = "torch-eager-cuda"
"""The teacher's second row when GPU students are measured: speedups, Pareto and recommendation are per device."""
SELECTIONS = ("default", "all")


@dataclass
class BenchConfig:
    """What to run and how much to measure."""

    timing: TimingConfig = field(default_factory=TimingConfig)
    """How each row is timed: batch sweep, runs, warm-up, threads (:class:`slimforge.export.measure.TimingConfig`)."""
    max_images: int | None = 512
    """Validation images for accuracy and agreement; ``None``: the whole validation split."""
    eval_batch_size: int = 32
    data_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of the teacher checkpoint's recorded DataConfig."""
    runtimes: list[str] = field(default_factory=lambda: ["default"])
    """Runtimes planned for artifacts that name none: registered names, ``default`` (every runtime that is not
    opt-in) and/or ``all``. A selected runtime this machine lacks becomes a skipped row with the reason."""
    accuracy_budget: float = 0.01
    """Recommend the fastest row whose accuracy is at least the teacher's minus this (0.01 = one point)."""
    isolate: bool = True
    """Measure each row in a fresh process: its own peak memory, and a crashing runtime loses only its row."""
    row_timeout: float = 1800.0
    """Seconds one isolated row may take before it is reported as an error."""
    peak_seconds: float = 1.0
    """Timed seconds per kernel of the matmul peak measurement; 0 skips it (no fraction of peak)."""
    peak_size: int = 2048
    """Square matrix size of the CPU peak measurement (large enough to be compute-bound)."""
    progress: bool = True
    """A tqdm progress bar on stderr."""
    note: str = ""
    """Free text printed at the top of the report (e.g. "random-init weights: accuracy is meaningless")."""
    allow_factory: bool = False
    """Benchmark checkpoints and artifacts whose description names a user factory (``source: factory``): rebuilding
    the model (to run a checkpoint, or to count an artifact's parameters and MACs) imports and runs that code."""

    def validate(self) -> list[str]:
        p = [f"timing.{x}" for x in self.timing.validate()]
        p += at_least(self, 1, "max_images")
        unknown = [r for r in self.runtimes if r not in SELECTIONS and r not in available_runtimes()]
        if unknown or not self.runtimes:
            p.append(f"runtimes: {unknown or 'none'}; choose from {', '.join([*SELECTIONS, *available_runtimes()])}")
        if not 0 <= self.accuracy_budget <= 1:
            p.append(f"accuracy_budget: {self.accuracy_budget} must be in [0, 1] (0.01 = one accuracy point)")
        if self.row_timeout <= 0:
            p.append(f"row_timeout: {self.row_timeout} must be > 0")
        return p + at_least(self, 0, "peak_seconds") + at_least(self, 16, "peak_size")
