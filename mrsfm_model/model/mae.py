"""Masked autoencoder on spectrograms: ViT encoder + ViT decoder from timm blocks.

Read top to bottom like facebookresearch/mae's models_mae.py (forward_encoder /
forward_decoder / forward_loss), with three changes: non-square images and patch grids
(spectrograms are 64 x 32 by default), fixed 2-D sin-cos position embeddings kept as
buffers, and the learned tokens living in tiny single-input submodules so that Opacus can
compute per-sample gradients with hooks (no functorch, whose vmap rejects random masking).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, ClassVar, NamedTuple

import torch
from timm.layers import LayerNorm, PatchEmbed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from mrsfm_model.config import from_section, load_config
from mrsfm_model.data.latents import NAMES as LATENT_NAMES
from mrsfm_model.data.latents import latent_loss, loss_weights


@dataclass(frozen=True)
class MAEConfig:
    """The MAE's architecture and pretext; values in configs/model/ (widths per size, recipe in
    _recipe.yaml), the image size and channels from configs/data/. Built by `configured_mae`."""

    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float
    mask_ratio: float
    norm_pix_loss: bool
    # LayerNorm on each patch embedding (timm's embed_norm_layer). It rescued unscaled spectrograms
    # (pixel std ~0.1, drowned by the position embedding) but also discards each patch's intensity;
    # scaling the input (data.spectrogram.scale) does better (configs/data/default.yaml).
    embed_norm: bool
    # Score the visible patches too (masked ones are always scored). With a denoising target
    # (data.denoise) the visible bands must then be reproduced noise-free, not copied.
    loss_visible: bool
    # Weight of a second pretext: regress the simulator's truth (data/latents.py) from the unmasked
    # tokens of simulated spectra; 0 = plain MAE (no head is built).
    latent_weight: float
    # Share of each batch's simulated spectra that also take the full-token pass the latent head
    # reads (evenly spaced rows; batches are shuffled). That pass sees all tokens, four times the
    # masked pass's at mask 0.75: 1.0 is the slowest; screen 14 measures what less costs.
    latent_fraction: float
    # Weigh the latent targets as unit-scale quantities and leave out those the magnitude image
    # cannot carry (data/latents.py, loss_weights); false: every target weighs 1 as before.
    latent_balanced: bool

    # How the MAE is trained, not what its weights are: a model may continue from, or be compared
    # with, weights made with other values of these (model/export.py init_mae).
    PRETEXT: ClassVar[tuple[str, ...]] = ("mask_ratio", "norm_pix_loss", "loss_visible", "latent_weight",
                                          "latent_fraction", "latent_balanced")

    @property
    def grid_size(self) -> tuple[int, int]:
        (h, w), (ph, pw) = self.img_size, self.patch_size
        return h // ph, w // pw

    def to_dict(self) -> dict:
        return asdict(self)

    def architecture(self) -> dict:
        """The settings that make the weights (everything but `PRETEXT`)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.PRETEXT}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> MAEConfig:
        """From a saved model's header or card; options added later take their behaviour before them."""
        before = {"embed_norm": False, "loss_visible": False, "latent_weight": 0.0, "latent_fraction": 1.0,
                  "latent_balanced": False}
        return from_section(cls, {**before, **raw}, "mae_config")


def mae_config(size: str = "base", **overrides: Any) -> MAEConfig:
    """The configured MAE of `configs/model/<size>.yaml` on the default image, `overrides` on top
    (e.g. `img_size=(64, 64)` in tests and benches)."""
    cfg = load_config([f"model={size}"])
    base = configured_mae(cfg.model, cfg.data).to_dict()
    return from_section(MAEConfig, {**base, **overrides}, "model")


class MAEOutput(NamedTuple):
    """What `SpectroMAE.forward` returns. The latent loss travels with the outputs rather than on
    the module, so a wrapper (Opacus, torch.compile) passes it through untouched."""

    loss: torch.Tensor  # the training loss: reconstruction + latent_weight x latent (per image with per_sample)
    pred: torch.Tensor  # (B, N, ph*pw*C) predicted patches
    mask: torch.Tensor  # (B, N), 1 = removed
    latent_loss: torch.Tensor | None  # the latent head's loss alone (detached batch mean); None: no latent pass


class PrependToken(nn.Module):
    """Owns the [CLS] token alone: (B, N, D) -> (B, 1 + N, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)


class MaskTokenFill(nn.Module):
    """Owns the [MASK] token alone: pads (B, n_keep, D) with mask tokens to (B, n_total, D)."""

    def __init__(self, dim: int, n_total: int):
        super().__init__()
        self.n_total = n_total
        self.token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fill = self.token.expand(x.shape[0], self.n_total - x.shape[1], -1).to(x.dtype)
        return torch.cat([x, fill], dim=1)


def _sincos(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(1, 1 + H*W, dim) fixed 2-D sin-cos embedding with a zero row for [CLS]."""
    pe = build_sincos2d_pos_embed(list(grid), dim=dim)
    return torch.cat([torch.zeros(1, dim), pe], dim=0).unsqueeze(0)


class SpectroMAE(nn.Module):
    def __init__(self, cfg: MAEConfig):
        super().__init__()
        if not 0 < cfg.latent_fraction <= 1:
            raise ValueError(f"config model.latent_fraction: expected a share in (0, 1], got {cfg.latent_fraction}")
        self.cfg = cfg
        n = cfg.grid_size[0] * cfg.grid_size[1]
        # encoder (names match timm's VisionTransformer, so export is a rename of two keys)
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim,
                                      norm_layer=partial(LayerNorm, eps=1e-6) if cfg.embed_norm else None)
        self.cls_token = PrependToken(cfg.embed_dim)
        self.register_buffer("pos_embed", _sincos(cfg.grid_size, cfg.embed_dim), persistent=False)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.depth)
        )
        self.norm = LayerNorm(cfg.embed_dim, eps=1e-6)  # as timm's ViT, so the encoder exports 1:1
        # decoder
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = MaskTokenFill(cfg.decoder_embed_dim, n)
        self.register_buffer("decoder_pos_embed", _sincos(cfg.grid_size, cfg.decoder_embed_dim), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_size[0] * cfg.patch_size[1] * cfg.in_chans)
        # linear on the flattened tokens, the read-out fine-tuning uses (finetune.global_pool=flat)
        self.latent_head = nn.Linear(n * cfg.embed_dim, len(LATENT_NAMES)) if cfg.latent_weight > 0 else None
        self.register_buffer("latent_weights", loss_weights(cfg.latent_balanced), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token.token, std=0.02)
        nn.init.normal_(self.mask_token.token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- patches ---------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, ph*pw*C), row-major over the patch grid."""
        (gh, gw), (ph, pw) = self.cfg.grid_size, self.cfg.patch_size
        b, c = imgs.shape[:2]
        x = imgs.reshape(b, c, gh, ph, gw, pw)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, gh * gw, ph * pw * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        (gh, gw), (ph, pw), c = self.cfg.grid_size, self.cfg.patch_size, self.cfg.in_chans
        x = x.reshape(x.shape[0], gh, gw, ph, pw, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * ph, gw * pw)

    # -- model -----------------------------------------------------------------------------
    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        """Keep a random (1 - ratio) subset per sample. Returns kept tokens, mask (1 = removed), restore index."""
        b, n, d = x.shape
        keep = max(1, int(round(n * (1 - mask_ratio))))
        noise = torch.rand(b, n, device=x.device, generator=generator)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:].to(imgs.dtype)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)
        return self._encode(x), mask, ids_restore

    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """Every token in grid order, nothing masked ([CLS] first): what a fine-tuned encoder sees."""
        return self._encode(self.patch_embed(imgs) + self.pos_embed[:, 1:].to(imgs.dtype))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cls_token(x)
        x = torch.cat([x[:, :1] + self.pos_embed[:, :1].to(x.dtype), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        cls, rest = x[:, :1], self.mask_token(x[:, 1:])
        rest = torch.gather(rest, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([cls, rest], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                     per_sample: bool = False) -> torch.Tensor:
        """Mean squared error on removed patches, per-patch normalised targets (MAE's norm_pix_loss).
        `per_sample`: one loss per image (B,), whose mean is the batch loss (DP ghost clipping)."""
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        if self.cfg.loss_visible:
            mask = torch.ones_like(mask)
        if per_sample:  # every image has the same number of masked patches
            return (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
        return (loss * mask).sum() / mask.sum().clamp_min(1)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None,
                per_sample: bool = False, target: torch.Tensor | None = None,
                latents: torch.Tensor | None = None) -> MAEOutput:
        """`target`: the image to reconstruct when it is not the input (denoising MAE); `latents`: the
        simulator's truth per image (NaN where unknown), regressed when the model has a latent head."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs if target is None else target, pred, mask, per_sample)
        latent_part = None
        if self.latent_head is not None and latents is not None and (rows := self.latent_rows(latents)).numel():
            pred_latents = self.latent_head(self.encode(imgs[rows])[:, 1:].flatten(1))
            aux = latent_loss(pred_latents, latents[rows], per_sample, self.latent_weights)
            latent_part = aux.detach().mean()
            if per_sample:  # rows left out score 0, the others stand for them (same batch mean)
                known = int(torch.isfinite(latents).any(dim=1).sum())
                aux = aux.new_zeros(imgs.shape[0]).index_put((rows,), aux * (known / rows.numel()))
            loss = loss + self.cfg.latent_weight * aux
        elif self.latent_head is not None:
            # no truth (private spectra, plain images); DP-SGD's clipping still needs every parameter's
            # per-sample gradient: a zero one (a second encoder pass would count as parameter tying there)
            zeros = imgs.new_zeros(imgs.shape[0], self.latent_head.in_features)
            zero = 0.0 * self.latent_head(zeros).sum(dim=1)
            loss = loss + (zero if per_sample else zero.mean())
        return MAEOutput(loss, pred, mask, latent_part)

    def latent_rows(self, latents: torch.Tensor) -> torch.Tensor:
        """Indices of the rows the latent head is trained on: those with any truth (simulated), a
        `latent_fraction` share of them, evenly spaced (no random draw: a step stays a function of
        its batch, and an unshuffled batch still spreads over every simulation profile)."""
        known = torch.isfinite(latents).any(dim=1).nonzero().squeeze(1)
        k = min(known.numel(), max(1, round(self.cfg.latent_fraction * known.numel())))
        if k == known.numel() or k == 0:
            return known
        pick = torch.div(torch.arange(k, device=latents.device) * known.numel(), k, rounding_mode="floor")
        return known[pick]

    def public_only_parameters(self) -> list[nn.Parameter]:
        """Parameters that batches without the simulator's truth (a site's private spectra) never
        train: the latent head. DP-SGD leaves them out of its private steps, which would give them
        noise and nothing else (training.privacy.PrivateSite)."""
        return [] if self.latent_head is None else list(self.latent_head.parameters())

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Image of the prediction in the input's units (undoing per-patch normalisation), visible patches kept."""
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        m = mask.unsqueeze(-1)
        return self.unpatchify(pred * m + target * (1 - m))


def configured_mae(model_cfg: Mapping, data_cfg: Mapping) -> MAEConfig:
    """The MAE config of `model/` for the configured image (size and channels from `data/`).
    A key the MAE does not know is refused (a typo would otherwise train another model)."""
    from_data = ("img_size", "in_chans")
    known = {f.name for f in fields(MAEConfig)} - set(from_data) | {"size"}
    unknown = sorted(set(model_cfg) - known)
    if unknown:
        raise ValueError(f"config model: unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    spec = data_cfg["spectrogram"]
    values = {k: v for k, v in model_cfg.items() if k != "size"}
    values.update(img_size=(spec["height"], spec["width"]), in_chans=len(data_cfg["channels"]))
    return from_section(MAEConfig, values, "model")


def build_mae(model_cfg, data_cfg) -> SpectroMAE:
    """MAE for the configured image: input size and channels come from the data config."""
    return SpectroMAE(configured_mae(model_cfg, data_cfg))


def mae_loss(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    """Loss function for the shared Trainer: batch is a data.Batch (or a plain image tensor)."""
    if not hasattr(batch, "x"):
        return model(batch).loss, {}
    out = model(batch.x, target=batch.target, latents=batch.latents)
    return out.loss, ({} if out.latent_loss is None else {"latent_loss": out.latent_loss})
