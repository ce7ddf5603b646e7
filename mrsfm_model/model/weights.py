"""Model files on disk: safetensors with metadata, written atomically. The one place that opens
them, so every reader refuses a file that is not one with the same clear error."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mrsfm_model.errors import MRSDataError
from mrsfm_model.files import atomic_path


class NotSafetensors(MRSDataError):
    """A file safetensors cannot open; `cause` is safetensors' own error (its types vary)."""

    def __init__(self, path: str | Path, cause: Exception):
        super().__init__(path, f"not a safetensors file ({cause})")
        self.cause = cause


def read_metadata(path: str | Path) -> dict[str, str]:
    """The file's metadata as stored (strings; what `save_weights` wrote is JSON inside them)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise NotSafetensors(path, exc) from None


def tensor_names(path: str | Path) -> list[str]:
    """The names of the tensors in the file, without reading them."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:
        raise NotSafetensors(path, exc) from None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, on the CPU."""
    try:
        return load_file(str(path))
    except Exception as exc:
        raise NotSafetensors(path, exc) from None


def write_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Atomic safetensors write (a crash never leaves half a file); metadata stored as given."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def save_weights(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """The model's state, each metadata value stored as JSON."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return write_tensors(tensors, path, {k: json.dumps(v) for k, v in (metadata or {}).items()})


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    model.load_state_dict(read_tensors(path), strict=strict)
