"""The content-addressed stage store: a stage computed once is reused by every trial (and worker) that needs it.

A stage's address is the SHA-256 of its kind, its inputs (the config it runs with) and its parents' addresses (a
checkpoint's is the digest of its weights and description), so two trials sharing a distilled student share its
folder. A stage is built in ``<store>/.tmp-<digest>-<host>-<pid>`` and renamed to ``<store>/<digest>`` only once
complete (a rename within one file system is atomic): a folder under its digest is whole, and a worker killed
mid-stage leaves only a temp folder, removed by the next worker on that host.

Example:
    >>> store = StageStore("runs/search/stages")  # doctest: +SKIP
    >>> stage = store.run("distil", "distil resnet10t", {"epochs": 1}, [teacher_digest], build)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimforge.train.errors import SlimforgeError

logger = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


class StageError(SlimforgeError):
    """A stage's command failed; ``problem`` holds its reason (a failed export gate, a crashed run)."""


@dataclass
class Stage:
    """A complete stage folder."""

    digest: str
    path: Path
    seconds: float
    """How long computing it took (when it was computed)."""
    reused: bool
    record: dict[str, Any]


def digest_of(kind: str, inputs: dict[str, Any], parents: list[str]) -> str:
    """The address of a stage: SHA-256 over its kind, inputs (canonical JSON) and parents' digests (16 hex digits)."""
    text = json.dumps({"kind": kind, "inputs": inputs, "parents": parents}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_digest(path: str | os.PathLike) -> str:
    """The digest of a slimforge checkpoint: its description and weights files, not its location."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            h.update(name.encode())
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageStore:
    """Stages under ``root/<digest>``, each with ``stage.json`` (kind, label, inputs, parents, seconds)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.host = socket.gethostname()

    def clean_orphans(self) -> int:
        """Removes temp folders of stages whose worker (on this host) is dead. Returns how many."""
        n = 0
        for tmp in self.root.glob(".tmp-*"):
            _, _, host_pid = tmp.name[len(".tmp-") :].partition("-")
            host, _, pid = host_pid.rpartition("-")
            if host == self.host and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)
                n += 1
        return n

    def get(self, digest: str) -> Stage | None:
        """The complete stage ``digest``, or None."""
        path = self.root / digest
        if not (path / STAGE_FILE).is_file():
            return None
        record = json.loads((path / STAGE_FILE).read_text())
        return Stage(digest, path, record["seconds"], True, record)

    def run(
        self,
        kind: str,
        label: str,
        inputs: dict[str, Any],
        parents: list[str],
        build: Callable[[Path], dict[str, Any]],
    ) -> Stage:
        """The stage of (kind, inputs, parents): reused when stored, else built by ``build(folder)``.

        Args:
            kind: Stage kind (``distil``, ``shrink``, ``qat``, ``export``, ``teacher-export``).
            label: How the log names it, e.g. ``distil resnet10t``.
            inputs: Everything that decides its result (the config it runs with).
            parents: Digests of the stages (or checkpoints) it starts from.
            build: Computes the stage into an empty folder and returns facts to record (e.g. the run's accuracy).

        Raises:
            StageError: ``build`` failed; nothing is stored.
        """
        digest = digest_of(kind, inputs, parents)
        stage = self.get(digest)
        if stage is not None:
            logger.info("reused stage %s (%s, saved %.0f s)", digest, label, stage.seconds)
            return stage
        tmp = self.root / f".tmp-{digest}-{self.host}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        logger.info("stage %s (%s): computing", digest, label)
        start = time.perf_counter()
        try:
            facts = build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = round(time.perf_counter() - start, 2)
        record = {"kind": kind, "label": label, "digest": digest, "inputs": inputs, "parents": parents}
        record.update(seconds=seconds, facts=facts, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        (tmp / STAGE_FILE).write_text(json.dumps(record, indent=2, default=str))
        try:
            os.rename(tmp, self.root / digest)
        except OSError:  # another worker stored the same stage meanwhile: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("stage %s (%s): done in %.0f s", digest, label, seconds)
        return Stage(digest, self.root / digest, seconds, False, record)


def run_command(cmd: list[str], folder: Path, timeout_s: float, what: str) -> int:
    """Runs ``cmd`` with its output in ``folder/command.log``; returns its exit code.

    Raises:
        StageError: it ran longer than ``timeout_s``.
    """
    (folder / "command.json").write_text(json.dumps(cmd))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(folder / "command.log", "w") as log:
        try:
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, env=env).returncode
        except subprocess.TimeoutExpired:
            raise StageError(f"{what} ran longer than {timeout_s:g} s", "raise launch.timeout_s") from None


def log_tail(folder: Path, lines: int = 6) -> str:
    """The last ``lines`` lines of a stage's command log that say something (errors first)."""
    text = (folder / "command.log").read_text(errors="replace").splitlines()
    errors = [line for line in text if line.startswith("error:") or "Error" in line]
    return " | ".join((errors or text)[-lines:]).strip()
