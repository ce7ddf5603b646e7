"""What a federated run leaves in its run directory, and how a restart finds where it stopped.

RUN_DIR/rounds/round_XXXX.safetensors is the global model after round XXXX (written last, so
it is the commit point of a round); round_XXXX.server.safetensors holds the server optimizer
state (FedAdam) beside it; metrics.jsonl has one line per completed round. On resume, lines of
rounds without a checkpoint (a crash between the two writes) are dropped, so the file never
repeats a round.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from mrsfm_model.files import write_atomic

_CKPT = re.compile(r"^round_(\d{4,})\.safetensors$")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.rounds = self.path / "rounds"
        self.metrics = self.path / "metrics.jsonl"

    def checkpoint(self, rnd: int) -> Path:
        return self.rounds / f"round_{rnd:04d}.safetensors"

    def server_state(self, rnd: int) -> Path:
        return self.rounds / f"round_{rnd:04d}.server.safetensors"

    def last_round(self) -> int:
        """Number of the last completed round (0: none)."""
        if not self.rounds.is_dir():
            return 0
        done = [int(m.group(1)) for p in self.rounds.iterdir() if (m := _CKPT.match(p.name))]
        return max(done, default=0)

    def read_metrics(self) -> list[dict]:
        """The complete lines; a torn last line (a file written by an older version, or copied while
        being written) is left out, as its round is redone on resume."""
        if not self.metrics.is_file():
            return []
        lines = [line for line in self.metrics.read_text(errors="replace").splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise ValueError(f"{self.metrics} line {i + 1} is not JSON (only a torn last line is "
                                     "tolerated)") from None
        return rows

    def _write_metrics(self, rows: list[dict]) -> None:
        write_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def trim_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after `last_round` (their checkpoint was never committed) and any torn line."""
        rows = self.read_metrics()
        keep = [r for r in rows if int(r.get("round", 0)) <= last_round]
        if self.metrics.is_file() and self.metrics.read_text(errors="replace") != "".join(
                json.dumps(r) + "\n" for r in keep):
            self._write_metrics(keep)

    def append_metrics(self, record: dict) -> None:
        """One more line, written as a whole new file and renamed into place: a crash leaves the old
        file or the new one, never half a line."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_metrics([*self.read_metrics(), record])

    def key(self) -> str:
        """A random id made when the run dir is first used and kept across resumes: sites keep their
        optimizer state under it, so a new run in a reused path never inherits a stale one."""
        p = self.path / "run_id"
        if not p.is_file() or not p.read_text().strip():
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(p, uuid.uuid4().hex[:12] + "\n")
        return p.read_text().strip()

    def load_sites(self) -> dict[int, str]:
        p = self.path / "sites.json"
        return {int(k): v for k, v in json.loads(p.read_text()).items()} if p.is_file() else {}

    def save_sites(self, sites: dict[int, str]) -> None:
        write_atomic(self.path / "sites.json", json.dumps({str(k): v for k, v in sites.items()}, indent=1))

