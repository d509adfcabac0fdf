"""User-facing errors: each names the problem and the fix, and entry scripts turn them into exit code 2."""

from __future__ import annotations

import os


class SlimforgeError(Exception):
    """A problem with the user's input, reported without a traceback.

    Args:
        problem: What is wrong, naming the offending file, field or value.
        fix: What the user should do about it.
    """

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)


class ConfigError(SlimforgeError):
    """The config (YAML or overrides) is invalid. ``problems`` lists every offending field."""

    def __init__(self, problems: list[str], fix: str = "") -> None:
        self.problems = list(problems)
        body = "invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(body, fix)


class CheckpointError(SlimforgeError):
    """A checkpoint is missing, incomplete, corrupted or does not match the model it describes."""


class DataError(SlimforgeError):
    """A dataset cannot be found or read."""


class ModelError(SlimforgeError):
    """A model cannot be built, or cannot take the configured input."""


class ExportError(SlimforgeError):
    """An export or its parity check failed."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters: how a foreign exception is quoted in a
    user-facing message (the full traceback goes to the debug log)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:limit].rstrip(": ")


RANK_GRACE_SECONDS = 10.0
"""How long a process other than rank 0 waits before printing its error (see :func:`report_error`)."""


def report_error(err: SlimforgeError) -> int:
    """Prints a user error as one message on stderr and returns exit code 2.

    Every entry script reports its :class:`SlimforgeError` through this, so all of them read the same::

        error: <problem>
          fix: <fix>

    Under a launcher every rank checks the same input and meets the same error; only one of them may print it.
    Rank 0 prints at once. Any other rank first waits :data:`RANK_GRACE_SECONDS`: the launcher (torchrun, which
    ``accelerate launch`` runs) stops every worker as soon as one exits, so when rank 0 met the error too this rank
    is stopped before it prints, and when rank 0 did not (an error only this rank saw) this rank prints it then.
    Without the wait, a rank that happened to finish first would exit silently and take rank 0 down before its
    message was out.
    """
    import sys
    import time

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        time.sleep(RANK_GRACE_SECONDS)
    print(f"error: {err}", file=sys.stderr, flush=True)
    return 2


def check_writable(path: str | os.PathLike, what: str = "output folder") -> None:
    """Checks that folder ``path`` can be created (or exists) and written to, without creating it.

    Run before any work starts, so a run that cannot save its results fails at once instead of at the end. A
    probe file is created and deleted in ``path`` (when it exists) or in its nearest existing parent.

    Args:
        path: The folder a command will write into.
        what: How the message names it, e.g. ``"train.output_dir"`` or ``"--out"``.

    Raises:
        SlimforgeError: ``path`` or one of its parents is a file, or the folder cannot be written.
    """
    import tempfile
    from pathlib import Path

    target = Path(path).absolute()
    fix = "choose a folder you can write to (its parents need not exist yet, but none of them may be a file)"
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SlimforgeError(f"{what} {str(path)!r} cannot be created: {existing} is a file, not a folder", fix)
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".slimforge-write-check-"):
            pass
    except OSError as e:
        how = "written to" if existing == target else f"created ({existing} cannot be written to)"
        raise SlimforgeError(f"{what} {str(path)!r} cannot be {how}: {e.strerror or e}", fix) from None
