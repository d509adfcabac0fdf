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
