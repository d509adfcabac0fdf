"""User-facing errors: each names the problem and the fix, and entry scripts turn them into exit code 2."""

from __future__ import annotations


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


def report_error(err: SlimforgeError) -> int:
    """Prints a user error as one message on stderr (rank 0 only under a launcher) and returns exit code 2.

    Every entry script reports its :class:`SlimforgeError` through this, so all of them read the same::

        error: <problem>
          fix: <fix>
    """
    import os
    import sys

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {err}", file=sys.stderr)
    return 2
