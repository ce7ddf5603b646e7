"""Files written whole: a reader (or a restart after a crash) sees the old file or the new one.
The one way the package replaces a file, whatever writes its bytes (text, safetensors, torch)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary file beside `path`, with permissions `mode` from before its first byte, for the
    caller to write by name; when the block ends it is flushed to disk and renamed over `path`,
    on any error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        yield tmp
        os.chmod(tmp, mode)  # again: a writer may have replaced the file rather than written into it
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes, mode: int = 0o644) -> Path:
    """`data` written to `path` whole (`atomic_path`)."""
    with atomic_path(path, mode) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)
