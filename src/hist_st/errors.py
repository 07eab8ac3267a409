"""Exceptions raised for bad user input.

Every error names the offending file (or object) and the problem, so a user can fix the input without
reading a traceback.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input data: names the source (file path or object) and what is wrong with it."""

    def __init__(self, source: str | Path | None, problem: str) -> None:
        self.source = str(source) if source is not None else None
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)
