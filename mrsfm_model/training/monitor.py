"""TensorBoard event files beside metrics.jsonl (which stays the record of truth).

`mrsfm pretrain` writes the training scalars (loss, lr, grad norm) and the ServerApp the rounds'
(aggregated and per-site loss, epsilon, bytes) into RUN_DIR/tensorboard; `train.tensorboard=false`
switches it off. `tensorboard --logdir RUN_DIR` shows them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class Scalars:
    """A SummaryWriter for RUN_DIR/tensorboard that takes plain dicts; a no-op when disabled.

    `resume_step`: the first step this process writes; events an earlier, interrupted process
    wrote from there on are dropped (TensorBoard's purge_step), so a resumed curve has no doubles."""

    def __init__(self, run_dir: str | Path | None, enabled: bool, resume_step: int | None = None):
        self.writer = None
        if enabled and run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard: heavy, only when wanted

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step or None)

    def add(self, values: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """Every finite number in `values` as scalar `prefix/key` at `step`."""
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self.writer.add_scalar(f"{prefix}/{key}" if prefix else key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
