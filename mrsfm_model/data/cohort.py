"""A labelled toy study: control vs lesion subjects from several vendor profiles, written as files.

Why: the study mode (`mrsfm finetune --data --labels`) needs a study to be tried on and its
defaults chosen on, and no labelled in vivo study ships with the project. Here the condition is a
change of concentrations only (configs/simulation/_cohort.yaml); linewidths, shift, phases, SNR,
baseline, water and macromolecules are drawn as in pretraining, so the label is in the chemistry
and nowhere else. Files and labels.csv look like a user's: one NIfTI-MRS file per subject,
columns `file`, `condition`, `vendor`, `group` and the true ratios to tCr.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch

from mrsfm_model.config import read_yaml
from mrsfm_model.data.canonical import CanonicalGrid
from mrsfm_model.data.simulate import Simulator, profile_dir, write_nifti

__all__ = ["write_cohort", "cohort_settings"]


def cohort_settings() -> dict:
    """The lesion effect, ratio columns and seed base of configs/simulation/_cohort.yaml."""
    return read_yaml(profile_dir() / "_cohort.yaml")


def write_cohort(profiles: Sequence[str], subjects: int, out_dir: str | Path, seed: int = 0,
                 grid: CanonicalGrid | None = None) -> Path:
    """`subjects` per profile (half of them, drawn at random, lesion) -> out_dir/*.nii.gz + labels.csv.

    Each subject's healthy concentrations are one draw of the profile's ranges; a lesion subject's
    are multiplied by the configured effect; the scan is then simulated with fresh nuisances."""
    s = cohort_settings()
    effect, names = s["lesion"], s["ratios"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for v, profile in enumerate(profiles):
        sim = Simulator(profile, grid, device="cpu")
        base = int(s["seed_base"]) + 1000 * seed + 10 * v
        lesion = torch.zeros(subjects, dtype=torch.bool)
        lesion[torch.randperm(subjects, generator=torch.Generator().manual_seed(base))[: subjects // 2]] = True
        healthy = sim.simulate(subjects, seed=base).concentrations
        fixed = {m: torch.where(lesion, c * float(effect.get(m, 1.0)), c) for m, c in healthy.items()}
        batch = sim.simulate(subjects, seed=base + 1, fixed=fixed)
        tag = (sim.vendor or sim.profile.name).lower()
        for i, spec in enumerate(batch.to_spectra()):
            truth = spec.provenance.extra["truth"]
            name = f"{tag}_sub{i:03d}.nii.gz"
            write_nifti(spec, batch, out / name)
            tcr = truth["Cr"] + truth["PCr"]
            rows.append({"file": name, "condition": "lesion" if lesion[i] else "control", "vendor": sim.vendor,
                         "group": f"{tag}-{i:03d}",
                         **{f"{m}/tCr": f"{truth.get(m, 0.0) / tcr:.5f}" for m in names}})
    labels = out / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return labels
