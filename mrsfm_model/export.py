"""Encoder export: the MAE's encoder alone as safetensors + a model card, and a loader that
returns a timm VisionTransformer ready for fine-tuning (decoder dropped, as in the seed)."""

from __future__ import annotations

import json
from pathlib import Path
from functools import partial
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer

from .errors import MRSDataError
from .mae import MAEConfig, SpectroMAE

ENCODER_PREFIXES = ("patch_embed.", "cls_token.", "blocks.", "norm.")


def encoder_state(model: SpectroMAE) -> dict[str, torch.Tensor]:
    """MAE encoder weights under timm VisionTransformer's names (cls_token, pos_embed)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith(ENCODER_PREFIXES):
            out["cls_token" if k == "cls_token.token" else k] = v.detach().contiguous().cpu()
    out["pos_embed"] = model.pos_embed.detach().contiguous().cpu()
    return out


def export_encoder(model: SpectroMAE, path: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write ENCODER.safetensors (config in its metadata) and ENCODER.json (the model card)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"mae_config": json.dumps(model.cfg.to_dict()), "format": "mrsfm-encoder-v1"}
    tmp = path.with_suffix(".tmp")
    save_file(encoder_state(model), str(tmp), metadata=meta)
    tmp.replace(path)
    card = {"architecture": "ViT encoder of a spectrogram MAE (timm VisionTransformer layout)",
            "config": model.cfg.to_dict(), **(card or {})}
    path.with_suffix(".json").write_text(json.dumps(card, indent=1, default=str))
    return path


def read_encoder_config(path: str | Path) -> MAEConfig:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise MRSDataError(path, f"not a safetensors file ({exc})") from None
    if meta.get("format") != "mrsfm-encoder-v1":
        raise MRSDataError(path, "not an mrsfm encoder (no mrsfm-encoder-v1 metadata)")
    raw = json.loads(meta["mae_config"])
    raw["img_size"], raw["patch_size"] = tuple(raw["img_size"]), tuple(raw["patch_size"])
    raw.setdefault("embed_norm", False)  # encoders exported before the option existed had none
    return MAEConfig(**raw)


def build_vit(cfg: MAEConfig, num_classes: int = 0, global_pool: str = "avg") -> VisionTransformer:
    """The timm ViT matching an MAE encoder config (fixed sin-cos position embedding)."""
    vit = VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=num_classes,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True, class_token=True, global_pool=global_pool, fc_norm=False,
        embed_norm_layer=partial(LayerNorm, eps=1e-6) if cfg.embed_norm else None,
    )
    from .mae import _sincos

    vit.pos_embed.data.copy_(_sincos(cfg.grid_size, cfg.embed_dim))
    vit.pos_embed.requires_grad_(False)
    return vit


def load_encoder(path: str | Path, num_classes: int = 0, global_pool: str = "avg") -> VisionTransformer:
    """Encoder file -> timm VisionTransformer with a fresh head of `num_classes` outputs."""
    from safetensors.torch import load_file

    cfg = read_encoder_config(path)
    vit = build_vit(cfg, num_classes, global_pool)
    missing, unexpected = vit.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if missing or unexpected:
        raise MRSDataError(path, f"encoder weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return vit
