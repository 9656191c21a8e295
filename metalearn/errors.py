"""Exceptions the library raises, each with the fix in its message."""

from __future__ import annotations

__all__ = ["CheckpointMismatchError", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """A loss or meta-gradient became NaN or Inf; ``task`` and ``step`` say where (None if unknown)."""

    def __init__(self, message: str, task: int | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.task = task
        self.step = step


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run with another configuration."""
