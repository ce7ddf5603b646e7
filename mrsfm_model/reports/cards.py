"""Model cards: the one place that says what an encoder card holds and reads it back.

Central (`mrsfm pretrain`) and federated (the ServerApp) pretraining write the same card through
`pretraining_card`: the input settings a fine-tune must match (grid, spectrogram, channels), the
data it saw and the recipe; fine-tuning and studies read it with `read_card`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def pretraining_card(cfg: Any, final_loss: float | None, **extra: Any) -> dict[str, Any]:
    """The card of an encoder pretrained with composed config `cfg`; `extra` adds what only one
    kind of run knows (steps and batch, or rounds, strategy and privacy)."""
    data = cfg.data
    return {
        "data": {"sim_profiles": list(data.sim_profiles), "invivo_dir": data.get("invivo_dir"),
                 "invivo_fraction": data.invivo_fraction},
        "grid": OmegaConf.to_container(data.grid), "spectrogram": OmegaConf.to_container(data.spectrogram),
        "channels": list(data.channels), "final_loss": final_loss, "init": cfg.get("init"),
        "recipe": {"model": OmegaConf.to_container(cfg.model), "train": OmegaConf.to_container(cfg.train),
                   "denoise": bool(data.denoise), "seed": int(cfg.seed)},
        **extra,
    }


def card_path(model_file: str | Path) -> Path:
    """ENCODER.json beside ENCODER.safetensors."""
    return Path(model_file).with_suffix(".json")


def read_card(model_file: str | Path) -> dict[str, Any] | None:
    """The card beside a model file, or None when it has none."""
    path = card_path(model_file)
    return json.loads(path.read_text()) if path.is_file() else None
