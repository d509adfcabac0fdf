"""Pruning: ``prune`` removes whole channels (structured)."""

from slimforge.compress.prune import structured  # noqa: F401  registers prune
