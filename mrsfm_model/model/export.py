"""Encoder export: the MAE's encoder alone as safetensors + a model card, and a loader that
returns a timm VisionTransformer ready for fine-tuning (decoder dropped, as in the seed)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer

from mrsfm_model.config import RESOURCES
from mrsfm_model.data.latents import NAMES as LATENT_NAMES
from mrsfm_model.errors import MRSDataError
from mrsfm_model.model.mae import MAEConfig, SpectroMAE, _sincos
from mrsfm_model.model.weights import read_metadata, read_tensors, save_weights, write_tensors

ENCODER_PREFIXES = ("patch_embed.", "cls_token.", "blocks.", "norm.")
# The MAE's latent head (a linear map from the flat band tokens to the simulator's truth, see
# data/latents.py) travels in the encoder file under this prefix: the pretrained model's own
# quantifier (model/quantifier.py). Fine-tuning ignores it.
HEAD_PREFIX = "latent_head."
# The pretrained model the package ships (made by `mrsfm pretrain`, see its card): NAME.safetensors is
# the encoder (+ NAME.json, the card), NAME.mae.safetensors the whole MAE, decoder included, so that
# pretraining, central or federated, can continue from it (`init=shipped`).
SHIPPED_DIR = RESOURCES / "encoders"
SHIPPED_NAME = "mrsfm_micro"
# `mrsfm quantify`'s default: the best measured quantifier (GABA/tCr R² with no labels, validation
# 0.621 vs micro 0.524, then test 0.544 vs 0.38; docs/results.md). Fine-tuning stays on micro: a tiny
# fine-tune step costs ~20x micro's on 2 CPU cores.
QUANTIFIER_NAME = "mrsfm_tiny"
# `mrsfm finetune --data --labels`'s default: the study mode reads frozen encoders (study.mode auto),
# where tiny's cost does not matter, and tiny scored higher than micro on five of the six simulated
# validation study tasks (docs/EXPERIMENTS.md, screen 16).
STUDY_NAME = "mrsfm_tiny"


def encoder_state(model: SpectroMAE) -> dict[str, torch.Tensor]:
    """MAE encoder weights under timm VisionTransformer's names (cls_token, pos_embed)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith(ENCODER_PREFIXES):
            out["cls_token" if k == "cls_token.token" else k] = v.detach().contiguous().cpu()
    out["pos_embed"] = model.pos_embed.detach().contiguous().cpu()
    return out


def export_encoder(model: SpectroMAE, path: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write ENCODER.safetensors (config in its metadata; the latent head too, when the MAE has one)
    and ENCODER.json (the model card)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"mae_config": json.dumps(model.cfg.to_dict()), "format": "mrsfm-encoder-v1"}
    state = encoder_state(model)
    head = getattr(model, "latent_head", None)
    if head is not None:
        state.update({HEAD_PREFIX + k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()})
        meta["latent_names"] = json.dumps(list(LATENT_NAMES))
    write_tensors(state, path, meta)
    card = {"architecture": "ViT encoder of a spectrogram MAE (timm VisionTransformer layout)",
            "config": model.cfg.to_dict(),
            **({"latent_head": {"outputs": list(LATENT_NAMES), "use": "mrsfm quantify"}} if head is not None else {}),
            **(card or {})}
    path.with_suffix(".json").write_text(json.dumps(card, indent=1, default=str))
    return path


def read_encoder_config(path: str | Path) -> MAEConfig:
    meta = read_metadata(path)
    if meta.get("format") != "mrsfm-encoder-v1":
        raise MRSDataError(path, "not an mrsfm encoder (no mrsfm-encoder-v1 metadata)")
    return MAEConfig.from_dict(json.loads(meta["mae_config"]))


class SpectroViT(VisionTransformer):
    """timm's VisionTransformer plus one readout, `flat`: the patch tokens concatenated in grid order
    (ppm band by ppm band), so the head knows which band a feature came from. Average pooling
    throws that position, i.e. the chemical identity, away; timm's other pools work as in timm."""

    def __init__(self, *, global_pool: str = "avg", **kwargs):
        flat = global_pool == "flat"
        super().__init__(global_pool="" if flat else global_pool, **kwargs)
        self.flat = flat
        if flat:
            self.reset_classifier(self.num_classes)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        if self.flat:
            return x[:, self.num_prefix_tokens:].flatten(1)
        return super().pool(x, pool_type)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if not getattr(self, "flat", False):
            return super().reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.patch_embed.num_patches * self.embed_dim
        self.head = torch.nn.Linear(self.num_features, num_classes) if num_classes else torch.nn.Identity()


def build_vit(cfg: MAEConfig, num_classes: int = 0, *, global_pool: str) -> VisionTransformer:
    """The timm ViT matching an MAE encoder config (fixed sin-cos position embedding). No default
    pool: the configured one is finetune.global_pool, timm's is avg; the caller says which."""
    vit = SpectroViT(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=num_classes,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True, class_token=True, global_pool=global_pool, fc_norm=False,
        embed_norm_layer=partial(LayerNorm, eps=1e-6) if cfg.embed_norm else None,
    )

    vit.pos_embed.data.copy_(_sincos(cfg.grid_size, cfg.embed_dim))
    vit.pos_embed.requires_grad_(False)
    return vit


def load_encoder(path: str | Path, num_classes: int = 0, *, global_pool: str) -> VisionTransformer:
    """Encoder file -> timm VisionTransformer with a fresh head of `num_classes` outputs, pooled by
    `global_pool` (no default, as `build_vit`)."""
    cfg = read_encoder_config(path)
    vit = build_vit(cfg, num_classes, global_pool=global_pool)
    state = {k: v for k, v in read_tensors(path).items() if not k.startswith(HEAD_PREFIX)}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if missing or unexpected:
        raise MRSDataError(path, f"encoder weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return vit


def shipped(kind: str = "encoder", name: str = SHIPPED_NAME) -> Path:
    """Path of a shipped encoder (`kind="encoder"`) or whole MAE (`"mae"`), the default one unless
    `name` says which (`shipped_names()`); a clear error if absent."""
    path = SHIPPED_DIR / (f"{name}.safetensors" if kind == "encoder" else f"{name}.mae.safetensors")
    if not path.is_file():
        raise MRSDataError(path, "the shipped pretrained model is missing from this installation "
                                 f"(shipped: {', '.join(shipped_names()) or 'none'}; reinstall mrsfm, or name a "
                                 "file with --encoder / init=PATH)")
    return path


def shipped_names() -> list[str]:
    """The encoders the package ships (mrsfm_model/resources/encoders/NAME.safetensors)."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.safetensors") if not p.name.endswith(".mae.safetensors"))


def resolve_encoder(value: str | Path) -> Path:
    """An --encoder argument: a shipped model's name (`mrsfm_tiny`, or just `tiny`) or a file path."""
    text = str(value)
    for name in (text, f"mrsfm_{text}"):
        if name in shipped_names() and not Path(text).is_file():
            return shipped(name=name)
    return Path(value)


def save_mae(model: SpectroMAE, path: str | Path) -> Path:
    """The whole MAE (encoder + decoder) with its config in the metadata: a start point for more pretraining."""

    return save_weights(model, Path(path), {"mae_config": model.cfg.to_dict(), "format": "mrsfm-mae-v1"})


def _shipped_mae_for(model: SpectroMAE) -> Path:
    """The shipped whole MAE of this model's architecture (the default one first)."""
    names = [SHIPPED_NAME] + [n for n in shipped_names() if n != SHIPPED_NAME]
    for name in names:
        path = SHIPPED_DIR / f"{name}.mae.safetensors"
        if path.is_file():
            raw = json.loads(read_metadata(path).get("mae_config", "{}"))
            if raw and MAEConfig.from_dict(raw).architecture() == model.cfg.architecture():
                return path
    return shipped("mae")  # none fits: the default one, whose load names the differing settings


def init_mae(model: SpectroMAE, init: str | Path) -> Path:
    """Load MAE weights to start (or continue) pretraining from: a file, or "shipped". The file must
    hold this very architecture; anything else is one clear error naming the file and both configs."""
    path = _shipped_mae_for(model) if str(init) == "shipped" else Path(init)
    if not path.is_file():
        raise MRSDataError(path, "init weights not found")
    meta = read_metadata(path)
    state = read_tensors(path)
    theirs = json.loads(meta["mae_config"]) if "mae_config" in meta else None
    if theirs is not None:
        theirs = {k: tuple(v) if isinstance(v, list) else v for k, v in theirs.items()}
        differ = [f"{k}: file {theirs.get(k)}, this run {v}" for k, v in model.cfg.architecture().items()
                  if theirs.get(k, v) != v]
        if differ:
            raise MRSDataError(path, "init weights are another model than this run's: " + "; ".join(differ))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        last = str(exc).splitlines()[-1].strip()[:160]
        raise MRSDataError(path, f"init weights do not fit this model ({last})") from None
    # the latent head is a pretraining tool: a run with one starts it afresh from a plain MAE, a run
    # without one ignores it
    missing = [k for k in missing if not k.startswith(HEAD_PREFIX)]
    unexpected = [k for k in unexpected if not k.startswith(HEAD_PREFIX)]
    if missing or unexpected:
        raise MRSDataError(path, f"init weights do not fit this model (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
    return path
