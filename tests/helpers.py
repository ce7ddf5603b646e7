"""Helpers the test files share (imported as `from helpers import ...`; fixtures live in conftest.py)."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
INVIVO = REPO / "mrsfm_model" / "resources" / "examples" / "invivo"  # real spectra the package ships
# [tool.flwr.app.config]: what Flower hands the ServerApp when a run sets nothing
APP_CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def run_module(module: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` from the repository root, as a user types it (e.g. `client --site X`)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str | None = None, poll_s: float = 0.2) -> bool:
    """Poll `cond` until it holds: True, or after `timeout_s` False (or TimeoutError naming `what`)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            if what:
                raise TimeoutError(f"waited {timeout_s:g} s for {what}")
            return False
        time.sleep(poll_s)
    return True


def text_of(path: Path) -> str:
    """A log's text so far ('' before the process has written it)."""
    return path.read_text(errors="replace") if path.exists() else ""


def live_members(pgid: int) -> list[str]:
    """Processes of group `pgid` that are not zombies (a killed orphan waits for init to reap it)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(stat.parent.name)
    return out


def phase(results: dict, key):
    """A module fixture's result for one phase, or a failure naming why that phase never ran."""
    import pytest

    if key not in results:
        pytest.fail(f"phase {key} did not run: {results.get('error')}")
    return results[key]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


class ScriptedGrid:
    """Plays the SuperLink's Grid API (push_messages / pull_messages) for WireGrid in unit tests:
    `reply(messages)` (a subclass's) answers everything pushed, and the next pull returns it."""

    def reply(self, messages) -> list:
        raise NotImplementedError

    def push_messages(self, messages) -> list[str]:
        messages = list(messages)
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
        self._pending = self.reply(messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids) -> list:
        out, self._pending = getattr(self, "_pending", []), []
        return out
