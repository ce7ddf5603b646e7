"""One error type for bad input, so commands can print one clear line and exit non-zero."""

from __future__ import annotations

from pathlib import Path


class MRSDataError(ValueError):
    """A file (or folder) that cannot be used, with the reason in words a user understands."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
