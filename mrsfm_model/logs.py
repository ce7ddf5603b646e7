"""One logger tree, `mrsfm`: `mrsfm.data`, `mrsfm.evaluation`, `mrsfm.server`, `mrsfm.client`, ...

Library code logs through `get_logger(...)`; it never configures handlers. The command line and
the site's ClientApp call `setup(level)` once: plain messages on stdout (the CLI's output stays as
it was), WARNING and above prefixed with their level on stderr. An application embedding mrsfm
routes or silences `mrsfm` like any other logger.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

Log = Callable[[str], None]  # what functions that report progress take: a logger's .info by default
ROOT = "mrsfm"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def get_logger(name: str) -> logging.Logger:
    """`mrsfm.<name>`, e.g. get_logger("evaluation.finetune")."""
    return logging.getLogger(f"{ROOT}.{name}")


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup(level: str | int = "INFO") -> logging.Logger:
    """Handlers of the `mrsfm` tree (idempotent): messages below WARNING as they are on stdout,
    warnings and errors as `warning: ...` on stderr. `level` names one of LEVELS."""
    if isinstance(level, str) and level.upper() not in LEVELS:
        raise ValueError(f"log level must be one of {'|'.join(LEVELS)}, got {level!r}")
    root = logging.getLogger(ROOT)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    root.propagate = False
    for h in list(root.handlers):
        if getattr(h, "_mrsfm", False):
            root.removeHandler(h)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    out.setFormatter(logging.Formatter("%(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(levelname_lower)s: %(message)s"))
    err.addFilter(_lower_level)
    for h in (out, err):
        h._mrsfm = True  # type: ignore[attr-defined]
        root.addHandler(h)
    return root


def _lower_level(record: logging.LogRecord) -> bool:
    record.levelname_lower = record.levelname.lower()
    return True
