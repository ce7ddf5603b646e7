"""The simulator's ground truth as a fixed vector of pretraining targets ("latents").

A simulated spectrum comes with everything that made it: concentrations, lineshape, shift,
phases, SNR, baseline, water. With `model.latent_weight > 0` the MAE also regresses these from
its unmasked tokens, so that the tokens must carry denoised, chemically meaningful quantities
rather than only what rebuilds a masked band. In vivo spectra have no truth: their rows are NaN
and take no part in that loss. The order and scaling below are fixed (not drawn from the data),
so every site of a federation regresses the same targets on the same scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

# Metabolite groups reported as log(group / tCr): ratios are what spectra determine (every
# spectrum is amplitude-normalised), logs make the narrow and the wide ranges comparable.
RATIOS: dict[str, tuple[str, ...]] = {
    "tNAA": ("NAA", "NAAG"), "GABA": ("GABA",), "Glu": ("Glu",), "Gln": ("Gln",), "GSH": ("GSH",),
    "mI": ("mI",), "tCho": ("GPC", "PCh", "Ch"), "Lac": ("Lac",), "Tau": ("Tau",), "Asp": ("Asp",),
    "PE": ("PE",), "Asc": ("Asc",), "Scyllo": ("Scyllo",),
}
TCR = ("Cr", "PCr")
# Nuisance parameters: name -> (truth key, transform, offset, scale); the target is
# (transform(truth) - offset) / scale, roughly unit scale; `decode` inverts it.
NUISANCE: dict[str, tuple[str, str | None, float, float]] = {
    "lorentzian": ("lorentzian_hz", None, 4.5, 2.0),
    "gaussian": ("gaussian_hz", None, 6.0, 2.3),
    "shift": ("shift_hz", None, 0.0, 5.8),
    "phase0_cos": ("phase0", "cos", 0.0, 0.7),
    "phase0_sin": ("phase0", "sin", 0.0, 0.7),
    "phase1": ("phase1", None, 0.0, 5.8),
    "log_snr": ("snr", "log", 3.9, 0.66),
    "baseline": ("baseline", None, 0.075, 0.043),
    "water": ("water", None, 1.5, 0.87),
}
_TRANSFORMS: dict[str | None, Callable[[torch.Tensor], torch.Tensor]] = {
    None: lambda v: v, "cos": lambda v: torch.cos(torch.deg2rad(v)), "sin": lambda v: torch.sin(torch.deg2rad(v)),
    "log": lambda v: torch.log(v.clamp(1e-3, 1e6)),
}
NAMES: tuple[str, ...] = tuple(RATIOS) + tuple(NUISANCE) + ("log_mm",)
# `model.latent_balanced`: each log ratio weighed as a unit-scale target, like the nuisance ones
# (their spread under the simulator's priors, 6 profiles x 2 000 draws; unweighted, GABA's
# log ratio counted ~1/15 of a nuisance target), and no weight on what the magnitude image
# cannot carry: the zero-order phase (magnitude is blind to it) and the water residual (above
# the image's top row, ~4.1 ppm).
RATIO_SCALES: dict[str, float] = {
    "tNAA": 0.27, "GABA": 0.26, "Glu": 0.27, "Gln": 0.26, "GSH": 0.26, "mI": 0.28, "tCho": 0.33, "Lac": 0.55,
    "Tau": 0.35, "Asp": 0.30, "PE": 0.26, "Asc": 0.35, "Scyllo": 0.47, "log_mm": 0.59,
}
UNSEEN: tuple[str, ...] = ("phase0_cos", "phase0_sin", "water")
# Edited only: GABA's 3.0 ppm signal is under tCr's in an unedited spectrum; its truth there is not
# asked for (NaN) when `latent_targets` is told the spectrum is unedited.
EDITED_ONLY: tuple[str, ...] = ("GABA",)


def loss_weights(balanced: bool) -> torch.Tensor:
    """(len(NAMES),) weights of the latent loss: ones, or the balanced set described above."""
    if not balanced:
        return torch.ones(len(NAMES))
    return torch.tensor([0.0 if n in UNSEEN else RATIO_SCALES.get(n, 1.0) ** -2 for n in NAMES])


def latent_targets(truth: Mapping[str, torch.Tensor], mm_names: tuple[str, ...] | list[str] = (),
                   edited: bool = True) -> torch.Tensor:
    """(n, len(NAMES)) float targets from a SimBatch's `truth`; NaN where the basis lacks a
    metabolite (or a parameter was not drawn), and for `EDITED_ONLY` ones of unedited spectra."""
    ref = next(iter(truth.values()))
    nan = torch.full_like(ref, math.nan, dtype=torch.float32)
    tcr = sum(truth[m].float() for m in TCR if m in truth)
    cols = []
    for name, members in RATIOS.items():
        present = [m for m in members if m in truth]
        if not present or not torch.is_tensor(tcr) or (name in EDITED_ONLY and not edited):
            cols.append(nan)
            continue
        cols.append(torch.log(sum(truth[m].float() for m in present).clamp_min(1e-3) / tcr.clamp_min(1e-3)))
    for key, transform, offset, scale in NUISANCE.values():
        cols.append((_TRANSFORMS[transform](truth[key].float()) - offset) / scale if key in truth else nan)
    mm = [truth[m].float() for m in mm_names if m in truth and not m.startswith("Lip")]
    cols.append(torch.log(sum(mm).clamp_min(1e-3) / tcr.clamp_min(1e-3)) if mm and torch.is_tensor(tcr) else nan)
    return torch.stack(cols, dim=1)


def latent_loss(pred: torch.Tensor, target: torch.Tensor, per_sample: bool = False,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the finite targets (NaN rows and columns are skipped), each column
    weighed by `weights` (`loss_weights`; None: all 1) in the sum and in the count."""
    ok = torch.isfinite(target)
    err = torch.where(ok, pred.float() - torch.nan_to_num(target.float()), torch.zeros_like(pred, dtype=torch.float32))
    w = torch.ones(target.shape[1], device=target.device) if weights is None else weights.to(target.device)
    sq, count = err**2 * w, ok * w
    if per_sample:
        return sq.sum(dim=1) / count.sum(dim=1).clamp_min(1e-6)
    return sq.sum() / count.sum().clamp_min(1e-6)


def decode(pred: torch.Tensor) -> dict[str, torch.Tensor]:
    """Predicted targets (n, len(NAMES)) -> physical quantities: each metabolite group's ratio to
    tCr ("GABA/tCr"), the macromolecules' ("MM/tCr"), and the nuisance parameters in the
    simulator's units (linewidths and shift in Hz, zero-order phase in degrees, SNR)."""
    col = {name: pred[:, j].float() for j, name in enumerate(NAMES)}
    out = {f"{name}/tCr": torch.exp(col[name]) for name in RATIOS}
    out["MM/tCr"] = torch.exp(col["log_mm"])
    unscaled = {name: col[name] * scale + offset for name, (_, _, offset, scale) in NUISANCE.items()}
    for name, (key, transform, _, _) in NUISANCE.items():
        if transform is None:
            out[key] = unscaled[name]
    out["phase0"] = torch.rad2deg(torch.atan2(unscaled["phase0_sin"], unscaled["phase0_cos"]))
    out["snr"] = torch.exp(unscaled["log_snr"])
    return out
