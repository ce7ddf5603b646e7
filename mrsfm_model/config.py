"""Hydra composition without @hydra.main, so servers, clients and the CLI share one config tree."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig


def config_dir() -> Path:
    """The repository's `configs/` (MRSFM_CONFIG_DIR overrides, e.g. for a site's own copy)."""
    env = os.environ.get("MRSFM_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "configs"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{path}: no config.yaml here; install mrsfm from its checkout with `pip install -e .` "
            "or set MRSFM_CONFIG_DIR to a configs folder"
        )
    return path


def load_config(overrides: Sequence[str] = (), name: str = "config") -> DictConfig:
    """Compose `configs/<name>.yaml` with Hydra overrides like `data.batch_size=8`."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            return compose(config_name=name, overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as exc:
            raise ValueError(f"bad config override {list(overrides)}: {exc}".splitlines()[0]) from None


def resolve_device(name: str | None = "auto") -> torch.device:
    """`auto` picks the GPU when there is one, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
