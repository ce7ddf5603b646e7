"""The pretrained model's own quantifier: the exported encoder plus the latent head it was pretrained
with (`model.latent_weight > 0`), read out as metabolite ratios to tCr and acquisition parameters.

Why: the head regresses the simulator's truth from the flat band tokens during pretraining, so it
is an amortised fit of every simulated spectrum the model saw. On the simulated validation
benchmark it estimates GABA/tCr and NAA/tCr without a single label better than any label-trained
arm or the linear-combination fit (docs/EXPERIMENTS.md, screen 9). Its estimates are only as good
as the match between the simulator and the data: on spectra from generators pretraining never saw
they are biased, and a few labelled spectra calibrate them (`calibrate`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mrsfm_model.data.latents import NAMES, decode
from mrsfm_model.errors import MRSDataError
from mrsfm_model.model.export import HEAD_PREFIX, load_encoder
from mrsfm_model.model.weights import read_metadata, read_tensors, tensor_names


class Quantifier(nn.Module):
    """Encoder (flat band tokens, as in pretraining) -> latent head: one row of `NAMES` per image."""

    def __init__(self, vit: nn.Module, head: nn.Linear):
        super().__init__()
        self.vit, self.head = vit, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit.forward_head(self.vit.forward_features(x), pre_logits=True))

    @torch.no_grad()
    def estimate(self, x: torch.Tensor, batch_size: int = 200) -> dict[str, torch.Tensor]:
        """Physical estimates (latents.decode) for a stack of images, in eval mode on the model's device."""
        self.eval()
        device = next(self.parameters()).device
        raw = torch.cat([self(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
        return decode(raw)


def has_quantifier(path: str | Path) -> bool:
    """True when the encoder file carries a latent head (pretrained with `model.latent_weight > 0`)."""
    return any(k.startswith(HEAD_PREFIX) for k in tensor_names(path))


def load_quantifier(path: str | Path) -> Quantifier:
    """Encoder file -> Quantifier; a clear error when the file has no head or another head layout."""
    vit = load_encoder(path, num_classes=0, global_pool="flat")
    state = {k[len(HEAD_PREFIX):]: v for k, v in read_tensors(path).items() if k.startswith(HEAD_PREFIX)}
    if not state:
        raise MRSDataError(path, "this encoder has no latent head to quantify with (it was pretrained with "
                                 "model.latent_weight=0); pretrain with the default recipe, or fine-tune on labels")
    names = json.loads(read_metadata(path).get("latent_names", "null"))
    if names != list(NAMES) or tuple(state["weight"].shape) != (len(NAMES), vit.num_features):
        raise MRSDataError(path, f"its latent head predicts {names} with weights {tuple(state['weight'].shape)}; this "
                                 f"release reads {len(NAMES)} outputs {list(NAMES)[:3]}...")
    head = nn.Linear(vit.num_features, len(NAMES))
    head.load_state_dict(state)
    return Quantifier(vit, head).eval()


def calibrate(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line truth ~ estimate: the 2-parameter correction a
    handful of labelled spectra fit, for data whose simulator match is unknown."""
    slope, intercept = np.polyfit(np.asarray(estimate, float), np.asarray(truth, float), 1)
    return float(slope), float(intercept)
