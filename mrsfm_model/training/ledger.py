"""A site's privacy ledger: what training on one private data set has spent, across runs and restarts.

One file per data set, named by the data's content hash, under the site's state folder (never
under a folder the server names): the accountant's history of every DP-SGD step ever taken on
these spectra, the runs it came from, and the rounds that trained on them without DP at all. A new
run, a new run directory or a restarted SuperNode therefore continue the same epsilon; the ledger
is what the site reports, not the server's bookkeeping.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mrsfm_model.files import write_atomic


def data_fingerprint(folder: str | Path) -> str:
    """sha256 over every file under `folder` (relative path, size, content), in name order: the
    same spectra give the same ledger wherever the folder is mounted."""
    root = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class PrivacyLedger:
    """STATE_DIR/privacy-ledger/<fingerprint>.json, written atomically."""

    def __init__(self, state_dir: str | Path, fingerprint: str):
        self.path = Path(state_dir) / "privacy-ledger" / f"{fingerprint[:32]}.json"
        self.entry: dict[str, Any] = {"fingerprint": fingerprint, "history": [], "runs": [],
                                      "unprotected_rounds": 0}
        if self.path.is_file():
            self.entry.update(json.loads(self.path.read_text()))

    @property
    def history(self) -> list[list[float]]:
        """Opacus accountant history: [noise multiplier, sample rate, steps] per stretch of steps."""
        return self.entry["history"]

    @property
    def unprotected_rounds(self) -> int:
        return int(self.entry["unprotected_rounds"])

    def record_private(self, history: list, run_key: str) -> None:
        """The accountant's history after a DP round (it started from this ledger's)."""
        self.entry["history"] = [list(h) for h in history]
        self._seen(run_key)
        self._save()

    def record_unprotected(self, run_key: str) -> None:
        """A round that trained on these spectra without DP: no epsilon bounds what it revealed."""
        self.entry["unprotected_rounds"] = self.unprotected_rounds + 1
        self._seen(run_key)
        self._save()

    def _seen(self, run_key: str) -> None:
        if run_key not in self.entry["runs"]:
            self.entry["runs"].append(run_key)

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.entry, indent=1))
