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
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def trim_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after `last_round` (their checkpoint was never committed)."""
        rows = self.read_metrics()
        keep = [r for r in rows if int(r.get("round", 0)) <= last_round]
        if len(keep) != len(rows):
            tmp = self.metrics.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            tmp.replace(self.metrics)

    def append_metrics(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def key(self) -> str:
        """A random id made when the run dir is first used and kept across resumes: sites keep their
        optimizer state under it, so a new run in a reused path never inherits a stale one."""
        p = self.path / "run_id"
        if not p.is_file():
            self.path.mkdir(parents=True, exist_ok=True)
            p.write_text(uuid.uuid4().hex[:12] + "\n")
        return p.read_text().strip()

    def load_sites(self) -> dict[int, str]:
        p = self.path / "sites.json"
        return {int(k): v for k, v in json.loads(p.read_text()).items()} if p.is_file() else {}

    def save_sites(self, sites: dict[int, str]) -> None:
        (self.path / "sites.json").write_text(json.dumps({str(k): v for k, v in sites.items()}, indent=1))
