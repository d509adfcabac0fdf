"""The search config: what to search over, on which runtime, within which budgets, and how many trials.

Loaded like every run config (``slimforge.train.config.load_config`` + ``section.key=value`` overrides), so every
unknown key, wrong type and impossible value is named in one error before any trial starts.

Example:
    >>> from slimforge.train.config import load_config
    >>> from slimforge.export.searching.config import SearchConfig
    >>> cfg = load_config(SearchConfig, "configs/search/mnist.yaml", ["trials.count=4"])
    >>> cfg.trials.count
    4
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from slimforge.train.config import at_least
from slimforge.train.data import DataConfig
from slimforge.train.optim import OptimConfig

Precision = Literal["fp32", "qat-int8", "ptq-int8"]


@dataclass
class StepSpace:
    """Candidates of one structural compression step: the registered method and the MAC fractions it keeps."""

    method: str
    """A registered compression method (``slimforge.compress.api.method_names()``), e.g. ``prune`` or ``lowrank``."""
    macs: list[float | None] = field(default_factory=lambda: [None])
    """Fractions of the student's multiply-accumulates to keep, one per candidate; null: the step is skipped."""
    options: dict[str, Any] = field(default_factory=dict)
    """The step's other options, the same for every candidate (e.g. ``{importance: taylor, round_to: 8}``)."""

    def step(self, macs: float) -> dict[str, Any]:
        """The recipe step of candidate ``macs`` (what a run config's ``compress:`` list holds)."""
        return {"method": self.method, **self.options, "macs": macs}

    def validate(self) -> list[str]:
        from slimforge.compress.api import method_names
        from slimforge.train.recipe import step_problems

        if self.method not in method_names():
            return [f"method: {self.method!r} is not a registered compression method ({', '.join(method_names())})"]
        if not self.macs:
            return ["macs: empty: list at least one candidate (null keeps the step out)"]
        problems = []
        for m in sorted({m for m in self.macs if m is not None}):
            problems += [f"macs={m:g}: {p.split(': ', 1)[-1]}" for p in step_problems([self.step(m)])]
        return sorted(set(problems))


@dataclass
class SpaceConfig:
    """The search space: each trial picks one value of every list."""

    students: list[str] = field(default_factory=list)
    """Candidate students by name: ``resnet10t`` (timm), ``timm:NAME``, ``torchvision:NAME`` or
    ``factory:package.module:function`` (needs ``allow_factory``). Built with random init (no download)."""
    prune: StepSpace = field(default_factory=lambda: StepSpace(method="prune"))
    """Structured pruning candidates, applied with a distillation run that recovers the accuracy."""
    lowrank: StepSpace = field(default_factory=lambda: StepSpace(method="lowrank"))
    """Low-rank factorisation candidates (applied after pruning when a trial picks both)."""
    precision: list[Precision] = field(default_factory=lambda: ["fp32"])
    """fp32: ONNX as trained; qat-int8: quantisation-aware training with the teacher, then QDQ int8 ONNX with the
    learned scales; ptq-int8: post-training int8 at export (calibrated on training images)."""
    temperature: list[float] = field(default_factory=lambda: [4.0])
    """Distillation temperatures (``loss.temperature``)."""
    alpha: list[float] = field(default_factory=lambda: [0.9])
    """Weights of the distillation term (``loss.alpha``; 1 - alpha on the labels)."""
    qat: dict[str, Any] = field(default_factory=dict)
    """Options of the ``qat`` step of qat-int8 trials (e.g. ``{calibration_images: 256}``)."""
    allow_factory: bool = False
    """Let ``factory:`` students run their Python function (it is imported and called)."""

    def validate(self) -> list[str]:
        from slimforge.train.recipe import step_problems

        p = []
        if not self.students:
            p.append("students: empty: name at least one candidate student, e.g. [resnet10t]")
        for name in self.students:
            problem = student_problem(name, self.allow_factory)
            if problem:
                p.append(f"students: {problem}")
        for what in ("precision", "temperature", "alpha"):
            if not getattr(self, what):
                p.append(f"{what}: empty: list at least one candidate")
        p += [f"alpha: {a:g} must be in [0, 1]" for a in self.alpha if not 0 <= a <= 1]
        p += [f"temperature: {t:g} must be > 0" for t in self.temperature if t <= 0]
        if "qat-int8" in self.precision:
            p += [f"qat{e.split(']', 1)[-1]}" for e in step_problems([{"method": "qat", **self.qat}])]
        return p


def student_model(name: str) -> dict[str, Any]:
    """The ``model`` section of a run config that builds candidate ``name`` from scratch."""
    source, sep, rest = name.partition(":")
    if not sep or source not in ("timm", "torchvision", "factory"):
        source, rest = "timm", name
    return {"source": source, "name": rest, "pretrained": False}


def student_problem(name: str, allow_factory: bool) -> str | None:
    """Why candidate ``name`` cannot be built here, or None."""
    model = student_model(name)
    if model["source"] == "timm":
        import timm

        if not timm.is_model(model["name"]):
            return f"{name!r} is not a timm model (timm.list_models() lists them)"
    elif model["source"] == "torchvision":
        import torchvision

        if model["name"] not in torchvision.models.list_models():
            return f"{name!r} is not a torchvision model (torchvision.models.list_models() lists them)"
    elif ":" not in model["name"]:
        return f"{name!r}: factory students are named factory:package.module:function"
    elif not allow_factory:
        return f"{name!r} runs user code: set space.allow_factory=true to allow it"
    return None


@dataclass
class TargetConfig:
    """Where the student will run and what it must achieve there."""

    runtime: str = "ort-cpu"
    """The benchmark runtime that judges latency (``export/benchmark.py``'s names, e.g. ``ort-cpu``)."""
    batch_size: int = 1
    """Batch size of the latency budget: batch 1 is the p50 of the batch-1 series, larger ones the mean time of a
    batch of that size."""
    latency_ms: float = 10.0
    """Latency budget in milliseconds per batch of ``batch_size`` on ``runtime``."""
    accuracy_drop: float = 1.0
    """Accuracy budget: at most this many points (percent) below the teacher on the same validation images."""

    def validate(self) -> list[str]:
        from slimforge.export.runtimes import available_runtimes, runtime_class

        p = at_least(self, 1, "batch_size")
        if self.latency_ms <= 0:
            p.append(f"latency_ms: {self.latency_ms:g} must be > 0")
        if self.accuracy_drop < 0:
            p.append(f"accuracy_drop: {self.accuracy_drop:g} must be >= 0 points")
        names = available_runtimes()
        if self.runtime not in names:
            p.append(f"runtime: {self.runtime!r} is not a benchmark runtime (known: {', '.join(names)})")
        else:
            ok, why = runtime_class(self.runtime).available()
            if not ok:
                usable = [n for n in names if runtime_class(n).available()[0]]
                p.append(f"runtime: {self.runtime} is not available on this machine ({why}); here: {', '.join(usable)}")
        return p


@dataclass
class TrialsConfig:
    """How many trials, for how long, and how each one trains."""

    count: int | None = 40
    """Trials the study holds when done (completed, pruned at the short fidelity or failed; a killed trial is retried
    and not counted), over every worker together; null: until ``max_seconds``."""
    max_seconds: float | None = None
    """Wall time from the study's first start after which no worker starts a new trial; null: no limit."""
    short_epochs: int = 1
    """Epochs of every training stage at the short fidelity (every trial runs it)."""
    long_epochs: int | None = 3
    """Epochs at the long fidelity (only trials that can still reach the front); null: one fidelity only."""
    max_steps: int | None = None
    """Cap on the optimizer updates of every training stage (``train.max_steps``); null: all epochs."""
    promote_margin: float = 1.0
    """A short-fidelity trial goes on to the long fidelity unless another short-fidelity trial is at least as fast
    and more than this many points more accurate."""
    seed: int = 42
    """Seeds the sampler and every training stage."""
    startup_trials: int = 8
    """Random trials before TPE models the space."""

    def validate(self) -> list[str]:
        p = at_least(self, 1, "count", "short_epochs", "long_epochs", "max_steps", "startup_trials")
        if self.count is None and self.max_seconds is None:
            p.append("count: set a trial count or max_seconds (or both), or the search never ends")
        if self.max_seconds is not None and self.max_seconds <= 0:
            p.append(f"max_seconds: {self.max_seconds:g} must be > 0")
        if self.long_epochs is not None and self.long_epochs <= self.short_epochs:
            p.append(f"long_epochs: {self.long_epochs} must be > short_epochs ({self.short_epochs}), or null")
        return p


@dataclass
class LaunchConfig:
    """How training stages run: ``accelerate launch`` subprocesses, so one trial may use a whole node."""

    config_file: str = "configs/accelerate/single.yaml"
    """The accelerate launch config (``configs/accelerate/``): it picks the topology of every training stage."""
    num_processes: int | None = None
    """``--num_processes`` for the launch; null: the launch config's."""
    timeout_s: float = 7200.0
    """A stage that runs longer is stopped and its trial recorded failed."""

    def validate(self) -> list[str]:
        from pathlib import Path

        p = at_least(self, 1, "num_processes")
        if not Path(self.config_file).is_file():
            p.append(f"config_file: {self.config_file} does not exist (see configs/accelerate/)")
        return p


@dataclass
class BenchConfig:
    """How much each trial's benchmark measures (``export/benchmark.py`` options)."""

    max_images: int = 512
    """Validation images (a class-stratified sample, the same for every trial and the teacher)."""
    runs: int = 200
    rounds: int = 5
    min_round_s: float = 0.4
    warmup: int = 10
    threads: int | None = None
    """Intra-op threads of the runtime; null: all cores."""

    def validate(self) -> list[str]:
        return at_least(self, 1, "max_images", "runs", "rounds", "warmup", "threads")


@dataclass
class SearchConfig:
    """A compression search: ``python export/search.py --config configs/search/mnist.yaml``."""

    teacher: str
    """The FP32 teacher's slimforge checkpoint directory."""
    output_dir: str = "runs/search"
    """Study folder: journal, stage store, trials, report and the front's artifacts."""
    storage: str | None = None
    """Optuna storage shared by every worker: a journal file path (on a shared file system) or an RDB URL
    (``sqlite:///...``, ``postgresql://...``); null: ``<output_dir>/journal.log``."""
    study_name: str = "slimforge-search"
    data: DataConfig = field(default_factory=DataConfig)
    """The data every training stage reads (as in run configs)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer of every training stage."""
    space: SpaceConfig = field(default_factory=SpaceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    trials: TrialsConfig = field(default_factory=TrialsConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    benchmark: BenchConfig = field(default_factory=BenchConfig)

    def validate(self) -> list[str]:
        from pathlib import Path

        if not (Path(self.teacher) / "slimforge.json").is_file():
            return [f"teacher: {self.teacher} is not a slimforge checkpoint (no slimforge.json in it)"]
        return []

    @property
    def storage_url(self) -> str:
        import os

        return self.storage or os.path.join(self.output_dir, "journal.log")
