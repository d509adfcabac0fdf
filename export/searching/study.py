"""The Optuna study every worker shares, and one worker's loop: ask a trial, run its chain, tell the result.

- **Storage**: ``optuna.storages.JournalStorage`` over a journal file (``JournalFileBackend``, on a file system every
  worker sees) or an RDB URL (``RDBStorage``): any number of ``export/search.py`` processes with the same config
  join one study, and a rerun after a kill resumes it.
- **Sampler**: multi-objective TPE (accuracy up, latency down) with the two budgets as constraints
  (``Trial.set_constraint``, c-TPE). NSGA-II spends its first generation (50 trials by default) at random, which is
  the whole of a 40-trial search; TPE models the space after ``trials.startup_trials``, and its constant liar keeps
  parallel workers from asking for the same recipe.
- **Killed trials**: each running trial's worker touches ``heartbeats/<trial>`` every ``HEARTBEAT_S``. A running
  trial whose worker is gone (its pid dead on this host, or its heartbeat older than ``STALE_S``) is set FAIL and
  queued again with the same recipe by Optuna's ``RetryHeartbeatStaleTrialCallback`` (JournalStorage has no
  heartbeat of its own, so the worker does the check, under the ask lock, before asking). A killed trial is not
  counted; its retry is.
- **Multi-fidelity**: every trial runs the whole chain at ``trials.short_epochs``. Optuna's pruners take one
  objective only (``Trial.report`` refuses a multi-objective study), so the rule is the search's own: a trial goes
  on to ``trials.long_epochs`` unless another trial's short result is at least as fast and more than
  ``trials.promote_margin`` points more accurate. Latency is a property of the architecture and precision, not of
  the epochs, so the short run measures it exactly; a trial not promoted is recorded PRUNED with its short result.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimforge.export.searching.chain import EXPORT_FORMAT, Chain, Recipe
from slimforge.export.searching.config import SearchConfig, SpaceConfig
from slimforge.export.searching.stages import StageError, StageStore, _pid_alive

if TYPE_CHECKING:
    import optuna
    from optuna.trial import TrialState

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
"""How often a worker touches its running trial's heartbeat file, in seconds."""
STALE_S = 120.0
"""A running trial whose heartbeat is older than this (seconds) is taken as killed, whatever its host."""


def open_study(cfg: SearchConfig) -> optuna.Study:
    """Creates or joins the study of ``cfg`` in its storage (optuna is imported here: only the search needs it)."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    url = cfg.storage_url
    if "://" in url:
        storage = RDBStorage(url)
    else:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(url))
    # Workers sharing one seed would draw the same random startup recipes; the pid makes them differ.
    sampler = optuna.samplers.TPESampler(
        seed=cfg.trials.seed * 100003 + os.getpid(),
        n_startup_trials=cfg.trials.startup_trials,
        constant_liar=True,
    )
    return optuna.create_study(
        storage=storage,
        sampler=sampler,
        study_name=cfg.study_name,
        directions=["maximize", "minimize"],
        load_if_exists=True,
    )


def suggest(trial: optuna.Trial, space: SpaceConfig) -> Recipe:
    """The recipe ``trial`` asks for (a retried trial gets its original's parameters back)."""
    return Recipe(
        student=trial.suggest_categorical("student", space.students),
        prune=trial.suggest_categorical("prune", space.prune.macs),
        lowrank=trial.suggest_categorical("lowrank", space.lowrank.macs),
        precision=trial.suggest_categorical("precision", space.precision),
        temperature=trial.suggest_categorical("temperature", space.temperature),
        alpha=trial.suggest_categorical("alpha", space.alpha),
    )


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts against ``trials.count``: every trial but a killed one (FAIL without a status)."""
    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL:
        return "status" in trial.user_attrs
    return trial.state != TrialState.WAITING


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (``flock``; released when the holder dies)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Heartbeat:
    """Touches a file every ``HEARTBEAT_S`` seconds while a trial runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop_event.is_set():
            self.path.touch()
            self.stop_event.wait(HEARTBEAT_S)

    def __enter__(self) -> _Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        self.thread.join()


def fail_stale(study: optuna.Study, folder: Path) -> list[int]:
    """Sets FAIL every running trial whose worker is gone and queues its recipe again. Returns their numbers."""
    from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    host, now, failed = socket.gethostname(), time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        beat = folder / "heartbeats" / str(t.number)
        age = now - (beat.stat().st_mtime if beat.exists() else t.datetime_start.timestamp())
        dead = worker.get("host") == host and not _pid_alive(int(worker.get("pid", 0)))
        if not (dead or age > STALE_S):
            continue
        try:
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # another worker got there first
            continue
        logger.warning("trial %d was killed (worker %s, heartbeat %.0f s old): queued again", t.number, worker, age)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback()(study, study._storage.get_trial(t._trial_id))
        failed.append(t.number)
    return failed


def _done(study: optuna.Study, cfg: SearchConfig) -> str | None:
    """Why no new trial may start, or None."""
    trials = study.get_trials(deepcopy=False)
    n = sum(counted(t) for t in trials)
    if cfg.trials.count is not None and n >= cfg.trials.count:
        return f"the study holds {n} of {cfg.trials.count} trials"
    started = study.user_attrs.get("started_at")
    if cfg.trials.max_seconds is not None and started and time.time() - started > cfg.trials.max_seconds:
        return f"the study has run {time.time() - started:.0f} s of its {cfg.trials.max_seconds:g} s"
    return None


def work(cfg: SearchConfig) -> int:
    """Runs trials of the shared study until its budget is spent. Returns how many this worker ran."""
    folder = Path(cfg.output_dir)
    store = StageStore(folder / "stages")
    store.clean_orphans()
    study = open_study(cfg)
    with _locked(folder / "ask.lock"):
        if "started_at" not in study.user_attrs:
            study.set_user_attr("started_at", time.time())
    chain = Chain(cfg, store)
    ran = 0
    while True:
        with _locked(folder / "ask.lock"):  # count + ask as one step: the study never holds more than its count
            fail_stale(study, folder)
            why = _done(study, cfg)
            if why is not None:
                logger.info("worker %d stops: %s", os.getpid(), why)
                return ran
            trial = study.ask()
            trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        with _Heartbeat(folder / "heartbeats" / str(trial.number)):
            state, values = run_trial(trial, chain, cfg, study)
        study.tell(trial, values, state=state)
        ran += 1


def run_trial(trial: optuna.Trial, chain: Chain, cfg: SearchConfig, study: optuna.Study) -> tuple[TrialState, Any]:
    """One trial's chain at the short fidelity, then the long one if it can still reach the front."""
    from optuna.trial import TrialState

    recipe = suggest(trial, cfg.space)
    chain.reset()
    folder = Path(cfg.output_dir) / "trials" / str(trial.number)
    logger.info("trial %d: %s", trial.number, recipe.label())
    start = time.perf_counter()
    try:
        result = evaluate(chain, recipe, cfg.trials.short_epochs, folder / "short")
        result["fidelity"] = "short"
        trial.set_user_attr("short", {k: result[k] for k in ("accuracy", "latency_ms", "teacher_accuracy")})
        long = cfg.trials.long_epochs
        if long is not None:
            rival = outrun_by(study, trial.number, result, cfg.trials.promote_margin)
            if rival is not None:
                _finish(trial, chain, result, start, "pruned", f"outrun at the short fidelity by trial {rival}")
                return TrialState.PRUNED, None
            result = evaluate(chain, recipe, long, folder / "long") | {"fidelity": "long"}
    except StageError as e:
        logger.error("trial %d failed: %s", trial.number, e.problem)
        _finish(trial, chain, {}, start, "failed", e.problem)
        return TrialState.FAIL, None
    drop = 100 * (result["teacher_accuracy"] - result["accuracy"])
    trial.set_constraint("accuracy", drop - cfg.target.accuracy_drop)
    trial.set_constraint("latency", result["latency_ms"] - cfg.target.latency_ms)
    _finish(trial, chain, result, start, "complete", None)
    return TrialState.COMPLETE, [result["accuracy"], result["latency_ms"]]


def evaluate(chain: Chain, recipe: Recipe, epochs: int, folder: Path) -> dict[str, Any]:
    """Trains, exports and benchmarks ``recipe`` at ``epochs``: the benchmark's numbers and the artifact's paths."""
    stage = chain.train(recipe, epochs)
    checkpoint = stage.path / "run" / "checkpoint"
    exported = chain.export(str(checkpoint), stage.digest, EXPORT_FORMAT[recipe.precision])
    artifact = exported.path / exported.record["facts"]["artifact"]
    result = chain.benchmark(artifact, folder / "benchmark")
    return result | {"artifact": str(artifact), "checkpoint": str(checkpoint), "epochs": epochs}


def outrun_by(study: optuna.Study, number: int, short: dict[str, Any], margin: float) -> int | None:
    """A trial whose short result is at least as fast as ``short`` and over ``margin`` points more accurate."""
    for t in study.get_trials(deepcopy=False):
        other = t.user_attrs.get("short")
        if t.number == number or other is None:
            continue
        if other["latency_ms"] <= short["latency_ms"] and 100 * (other["accuracy"] - short["accuracy"]) > margin:
            return t.number
    return None


def _finish(trial: optuna.Trial, chain: Chain, result: dict, start: float, status: str, reason: str | None) -> None:
    trial.set_user_attr("result", result)
    trial.set_user_attr("stages", list(chain.stages))
    trial.set_user_attr("saved_s", round(chain.saved_s, 2))
    trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
    trial.set_user_attr("reason", reason)
    trial.set_user_attr("status", status)  # last: a trial killed before this line is not counted
