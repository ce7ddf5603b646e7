"""Hydra composition without @hydra.main, so servers, clients and the CLI share one config tree."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

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


def resolve_device(name: str | None = "auto") -> "torch.device":
    """`auto` picks the GPU when there is one, else the CPU (torch imported here: the site
    launcher reads configs without paying for it)."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def from_section(cls, cfg, section: str):
    """Build dataclass `cls` from a config mapping, checking each value against the field's
    default type, so `hop=abc` fails with the key's name instead of deep inside a kernel."""
    import dataclasses

    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in cfg:
            continue
        value, default = cfg[f.name], f.default
        try:
            if value is None or default is None or default is dataclasses.MISSING:
                kwargs[f.name] = value if not hasattr(value, "__iter__") or isinstance(value, str) else tuple(value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError
                kwargs[f.name] = value
            elif isinstance(default, tuple):
                kwargs[f.name] = tuple(type(d)(v) for d, v in zip(default, value, strict=True))
            elif isinstance(default, (int, float)) and isinstance(value, str):
                raise ValueError
            else:
                kwargs[f.name] = type(default)(value)
        except (TypeError, ValueError):
            raise ValueError(f"config {section}.{f.name}: expected {type(default).__name__} like {default!r}, "
                             f"got {value!r}") from None
    return cls(**kwargs)
