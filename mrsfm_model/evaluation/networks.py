"""The networks every evaluation starts from, and their read-out heads: one place for the
benchmark (finetune.py), a study (study.py) and prediction (predict.py), so a model saved by a
study is rebuilt by prediction exactly as it was trained.

An arm's network is the pretrained encoder, the same MAE encoder at its initialisation
(RANDOM_INIT: what pretraining adds) or timm's own initialisation of the same ViT (scratch). A
frozen read-out (FROZEN_READOUTS) is that network followed by the regularised linear model of
evaluation/linear.py, fitted on its pooled features (linear) or on its latent head's outputs
(latent).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mrsfm_model.data.latents import NAMES as LATENT_NAMES
from mrsfm_model.data.stream import InputBuilder
from mrsfm_model.errors import MRSDataError
from mrsfm_model.evaluation.linear import Penalty, fit_linear, linear_head
from mrsfm_model.model.export import build_vit, encoder_state, load_encoder, read_encoder_config
from mrsfm_model.model.mae import MAEConfig, SpectroMAE, configured_mae
from mrsfm_model.model.quantifier import Quantifier, load_quantifier
from mrsfm_model.reports.cards import read_card

RANDOM_INIT = "random-init"  # `encoder` value of the control arm: the MAE's encoder at its initialisation
FROZEN_READOUTS = ("linear", "latent")  # modes that fit a linear model on a frozen network's outputs


def arm_start(arm: str, encoder: str | Path | None) -> str | Path | None:
    """What a deep arm's ViT starts from (`start_network`): the encoder, its initialisation, or timm's."""
    return {"pretrained": encoder, "random_init": RANDOM_INIT, "scratch": None}[arm]


def start_network(encoder: str | Path | None, mae_cfg: MAEConfig, n_out: int, pool: str) -> nn.Module:
    """The ViT an arm starts from: pretrained weights (a path), the MAE encoder exactly as pretraining
    would have started it (RANDOM_INIT: the control that isolates what pretraining adds), or timm's
    own initialisation of the same architecture (None: scratch)."""
    if encoder == RANDOM_INIT:
        return random_init_encoder(mae_cfg, n_out, pool)
    if encoder:
        return load_encoder(encoder, num_classes=n_out, global_pool=pool)
    return build_vit(mae_cfg, num_classes=n_out, global_pool=pool)


def random_init_encoder(mae_cfg: MAEConfig, n_out: int, pool: str) -> nn.Module:
    """The MAE's encoder at initialisation (seeded by the caller's torch seed), as a timm ViT."""
    return _random_init_parts(mae_cfg, n_out, pool)[0]


def _random_init_parts(mae_cfg: MAEConfig, n_out: int, pool: str) -> tuple[nn.Module, nn.Linear | None]:
    """(the MAE's encoder at initialisation as a timm ViT, its latent head at initialisation)."""
    mae = SpectroMAE(mae_cfg)  # drawn first: the same weights a pretraining run seeded alike starts from
    vit = build_vit(mae_cfg, num_classes=n_out, global_pool=pool)
    missing, _ = vit.load_state_dict(encoder_state(mae), strict=False)
    assert all(k.startswith("head.") for k in missing), missing
    return vit, mae.latent_head


class PooledFeatures(nn.Module):
    """Frozen ViT -> pooled pre-logit features."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)


def frozen_network(encoder: str | Path | None, mae_cfg: MAEConfig, readout: str, pool: str, n_out: int) -> nn.Module:
    """The frozen network a read-out fits its linear model on (call after seeding, like `start_network`).

    linear: the ViT's pooled features. latent: its latent head's outputs: the pretrained head, the
    MAE's head at initialisation (RANDOM_INIT), or for timm's scratch ViT a head initialised as the
    MAE initialises its own, so every arm reads the same number of outputs the same way."""
    if readout == "linear":
        vit = start_network(encoder, mae_cfg, n_out, pool)  # n_out: the same random draws as a full fine-tune's start
        vit.reset_classifier(0)
        return PooledFeatures(vit)
    if encoder == RANDOM_INIT:
        vit, head = _random_init_parts(mae_cfg, 0, "flat")
        if head is None:
            raise ValueError("finetune mode latent needs a model with a latent head (model.latent_weight > 0)")
        return Quantifier(vit, head)
    if encoder:
        return load_quantifier(encoder)
    vit = build_vit(mae_cfg, num_classes=0, global_pool="flat")
    head = nn.Linear(vit.num_features, len(LATENT_NAMES))
    nn.init.xavier_uniform_(head.weight)
    nn.init.zeros_(head.bias)
    return Quantifier(vit, head)


@torch.no_grad()
def network_outputs(model: nn.Module, x: torch.Tensor, device: torch.device, bs: int = 64) -> torch.Tensor:
    """The model's outputs for images x, in batches of `bs`, on the CPU as float32."""
    model.eval().to(device)
    return torch.cat([model(x[i:i + bs].to(device)).float().cpu() for i in range(0, len(x), bs)])


def fit_readout(net: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, n_out: int, l2: Penalty,
                device: torch.device, feats: np.ndarray | None = None) -> nn.Module:
    """A frozen network followed by the regularised linear model fitted on its outputs (`feats`,
    when the caller has them already): one module mapping images to logits or values."""
    if feats is None:
        feats = network_outputs(net, x, device).numpy()
    target = y.numpy() if task == "classification" else y.numpy().reshape(len(y), -1)
    return nn.Sequential(net, fit_linear(feats, target, task, n_out, l2).to(device)).eval()


def fit_probe(vit: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, n_out: int, l2: Penalty,
              device: torch.device) -> nn.Sequential:
    """The linear probe: the same regularised logistic / ridge regression as the non-deep baselines
    (L2 chosen from `l2`) on the frozen ViT's pooled features, as BatchNorm + Linear."""
    return fit_readout(PooledFeatures(vit), x, y, task, n_out, l2, device)[1]


@torch.no_grad()
def fold_probe_into_head(vit: nn.Module, probe: nn.Sequential) -> None:
    """vit.head := BatchNorm (running statistics) followed by the probe's Linear, as one Linear
    (LP-FT: the full fine-tune's first step starts where the probe ended)."""
    bn, lin = probe[0], probe[1]
    scale = (bn.running_var + bn.eps).float().rsqrt()
    vit.head.weight.copy_(lin.weight * scale)
    vit.head.bias.copy_(lin.bias - (lin.weight * scale) @ bn.running_mean)


def study_network(meta: dict[str, Any]) -> nn.Module:
    """The module layout a study's final model has in its mode (its file's metadata), weights
    not loaded: full: the ViT; linear: ViT + fitted head; latent: ViT + latent head + fitted head."""
    mae_cfg = MAEConfig.from_dict(meta["mae_config"])
    n_out = len(meta["labels"]) if meta["task"] == "classification" else 1
    pool = meta.get("global_pool", "avg")  # study models saved before the option pooled by average
    if meta["mode"] == "linear":
        vit = build_vit(mae_cfg, num_classes=0, global_pool=pool)
        return nn.Sequential(PooledFeatures(vit), linear_head(vit.num_features, n_out))
    if meta["mode"] == "latent":
        vit = build_vit(mae_cfg, num_classes=0, global_pool="flat")
        net = Quantifier(vit, nn.Linear(vit.num_features, len(LATENT_NAMES)))
        return nn.Sequential(net, linear_head(len(LATENT_NAMES), n_out))
    return build_vit(mae_cfg, num_classes=n_out, global_pool=pool)


def architecture(cfg, encoder: Path | None, builder: InputBuilder) -> MAEConfig:
    """The ViT config: the encoder's own, checked against the inputs; else the configured size.
    An encoder pretrained on other inputs than the run makes (image size, channels, or any grid or
    spectrogram setting on its card) is refused: its features would mean something else."""
    if encoder is None:
        return configured_mae(cfg.model, cfg.data)
    if not encoder.is_file():
        raise MRSDataError(encoder, "encoder file not found")
    c, h, w = builder.image_shape
    mae_cfg = read_encoder_config(encoder)
    if tuple(mae_cfg.img_size) != (h, w) or mae_cfg.in_chans != c:
        raise ValueError(f"{encoder}: encoder expects {mae_cfg.in_chans}x{tuple(mae_cfg.img_size)} images but the "
                         f"data config makes {c}x{(h, w)}")
    differ = input_differences(encoder, builder)
    if differ:
        raise ValueError(f"{encoder}: pretrained on other inputs than this run makes: {'; '.join(differ)}")
    return mae_cfg


def input_differences(encoder: Path, builder: InputBuilder) -> list[str]:
    """Each data.* setting in which the encoder's pretraining (per its card) differs from this run,
    as 'data.KEY: encoder A, this run B'."""

    card = read_card(encoder) or {}
    try:
        theirs = InputBuilder.from_dict({"grid": card.get("grid", {}), "spectrogram": card.get("spectrogram", {}),
                                         "channels": card.get("channels", builder.channels)})
    except (ValueError, TypeError) as exc:
        return [f"its card's input settings are unreadable ({exc})"]
    out = []
    for section, a, b in (("grid", theirs.grid, builder.grid), ("spectrogram", theirs.spec_cfg, builder.spec_cfg)):
        if section in card:
            da, db = asdict(a), asdict(b)
            out += [f"data.{section}.{k}: encoder {da[k]}, this run {db[k]}" for k in da if da[k] != db[k]]
    if "channels" in card and theirs.channels != builder.channels:
        out.append(f"data.channels: encoder {theirs.channels}, this run {builder.channels}")
    return out
