"""Model weights on disk: safetensors with JSON metadata, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn


def save_weights(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Atomic safetensors write (a crash never leaves half a checkpoint)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
    return path


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    model.load_state_dict(load_file(str(path)), strict=strict)
