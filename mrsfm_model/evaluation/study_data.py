"""A study's spectra loaded for its labels (images for the deep arms, spectra for the baseline),
the refusals of tables that cannot support an honest evaluation, and the grouped, stratified
cross-validation folds."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mrsfm_model.config import ConfigSection
from mrsfm_model.data.io import load_spectrum
from mrsfm_model.data.stream import InputBuilder
from mrsfm_model.errors import MRSDataError
from mrsfm_model.evaluation.finetune import FinetuneConfig
from mrsfm_model.evaluation.labels import (
    LabelRow,
    Warnings,
    existing_rows,
    numeric_rows,
    read_labels,
    resolve_task,
    unlisted_files,
)
from mrsfm_model.evaluation.lcm import fit_ratio_features
from mrsfm_model.evaluation.networks import FROZEN_READOUTS
from mrsfm_model.evaluation.tasks import spectrum_features
from mrsfm_model.logs import Log, get_logger
from mrsfm_model.model.mae import MAEConfig

_log = get_logger("evaluation")


# --------------------------------------------------------------------------- settings
@dataclass
class StudyConfig(ConfigSection):
    """A study's CV settings; values (and their reasons) in configs/study/default.yaml."""

    SECTION = "study"
    folds: int
    seeds: tuple[int, ...]
    mode: str  # auto | full | linear | latent
    steps: int
    batch_size: int
    baseline_ppm: tuple[float, float]
    fit_arm: bool  # also score logistic / ridge regression on each spectrum's fitted metabolite ratios
    small_class: int

    def check(self) -> None:
        if self.folds < 2 or not self.seeds or self.mode not in ("auto", "full", *FROZEN_READOUTS) or self.steps < 1:
            raise ValueError(f"config study: need folds >= 2, at least one seed, mode auto|full|linear|latent and "
                             f"steps >= 1, "
                             f"got folds={self.folds} seeds={list(self.seeds)} mode={self.mode} steps={self.steps}")

    def finetune(self, cfg) -> FinetuneConfig:
        """The shared fine-tuning settings with this study's mode, steps and batch size."""
        base = dict(cfg.get("finetune") or {})
        mode = "linear" if self.mode == "auto" else self.mode  # auto: a frozen read-out, chosen per training set
        return FinetuneConfig.from_config({**base, "mode": mode, "steps": self.steps, "batch_size": self.batch_size})

    def readouts(self, mae_cfg: MAEConfig, encoder: Path | None) -> tuple[str, ...]:
        """The frozen read-outs mode auto chooses from: the band tokens, and the latent head's
        estimates when the model has one; () for a fixed mode. A fixed `latent` on an encoder
        without a head is refused here, before any work."""
        has_head = mae_cfg.latent_weight > 0
        if self.mode == "latent" and not has_head:
            raise ValueError(f"study.mode=latent reads the encoder's latent head, and "
                             f"{encoder or 'this model'} has none (pretrained with model.latent_weight=0); "
                             f"use study.mode=linear or auto")
        if self.mode != "auto":
            return ()
        return FROZEN_READOUTS if has_head else ("linear",)


# --------------------------------------------------------------------------- loading the study
@dataclass
class StudyData:
    """The usable part of a study, as model inputs, in labels.csv order."""

    files: list[str]
    groups: np.ndarray  # (N,) str; a group of its own per file when labels.csv has no group column
    task: str
    labels: list[str]  # class names (classification), [] for regression
    y: np.ndarray  # (N,) int class index or float target
    x: torch.Tensor  # (N, C, H, W) spectrograms
    features: np.ndarray  # (N, F) baseline features
    fit_features: np.ndarray | None  # (N, groups) log ratios to tCr from a linear-combination fit (the `fit` arm)
    grouped: bool
    vendors: list[str]
    formats: list[str]
    warnings: list[str]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def n_classes(self) -> int:
        return len(self.labels)


def spectral_features(fids: np.ndarray, builder: InputBuilder, ppm: Sequence[float]) -> np.ndarray:
    """Magnitude spectrum inside `ppm` of each channel, concatenated: the baseline's input
    (the same features as the built-in benchmark's baseline arm)."""

    batch = torch.from_numpy(np.ascontiguousarray(fids))[None]
    return spectrum_features(batch, builder.grid, (float(ppm[0]), float(ppm[1])))[0].numpy()


def _suffix(name: str) -> str:
    low = name.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else Path(low).suffix


def _load_rows(rows: list[LabelRow], builder: InputBuilder, ppm: Sequence[float], labels_csv: Path,
               warn: Log) -> tuple[list[LabelRow], list, list[np.ndarray], list[str], list]:

    kept, images, feats, vendors, canonical = [], [], [], [], []
    for r in rows:
        try:
            spec = load_spectrum(r.path)
            prep = builder.prepare(spec)
        except MRSDataError as err:
            warn(f"{labels_csv.name} line {r.line}: {r.file} cannot be used ({err.problem}); row dropped")
            continue
        kept.append(r)
        images.append(prep.image)
        feats.append(spectral_features(prep.fids, builder, ppm))
        vendors.append(spec.provenance.vendor or "unknown")
        canonical.append(prep.canonical)
    return kept, images, feats, vendors, canonical


def _encode(rows: list[LabelRow], task: str) -> tuple[list[str], np.ndarray]:
    if task == "regression":
        return [], np.array([float(r.value) for r in rows])
    labels = sorted({r.value for r in rows})
    return labels, np.array([labels.index(r.value) for r in rows], dtype=np.int64)


def _check_usable(rows: list[LabelRow], n_listed: int, task: str, target: str, labels_csv: Path) -> None:
    """Refuse tables that cannot support an evaluation, saying why."""
    if not rows:
        raise MRSDataError(labels_csv, f"no usable rows: none of the {n_listed} files it lists can be used "
                                       "(see the warnings above)")
    if task == "classification":
        counts = Counter(r.value for r in rows)
        if len(counts) < 2:
            (only, n), = counts.items()
            raise MRSDataError(labels_csv, f"target {target!r} has a single class ({only!r}, {n} usable spectra); "
                                           "classification needs at least two classes")
        groups = {c: len({r.unit for r in rows if r.value == c}) for c in counts}
        thin = sorted(c for c, g in groups.items() if g < 2)
        if thin:
            names = ", ".join(map(repr, thin[:5])) + (f" and {len(thin) - 5} more" if len(thin) > 5 else "")
            raise MRSDataError(labels_csv, f"class {names} of {target!r} has a single subject/group (or spectrum), "
                                           "so it cannot be both trained on and tested; add data or remove the class")
    else:
        values = np.array([float(r.value) for r in rows])
        if len({r.unit for r in rows}) < 3 or np.ptp(values) == 0:
            raise MRSDataError(labels_csv, f"target {target!r} needs at least 3 groups with differing values for "
                                           f"regression (usable: {len(values)} spectra, range {np.ptp(values):g})")


def load_study(cfg, data_dir: Path, labels_csv: Path, target: str, task: str | None = None,
               log: Log = _log.info) -> StudyData:
    """labels.csv + DIR -> StudyData, dropping unusable rows with a warning each; refuses what cannot work."""
    data_dir, labels_csv = Path(data_dir), Path(labels_csv)
    scfg = StudyConfig.from_config(cfg.get("study"))
    warn = Warnings(log)
    if not data_dir.is_dir():
        raise MRSDataError(data_dir, "study data folder does not exist")
    table = read_labels(labels_csv, data_dir, target, warn)
    if not table.grouped:
        warn(f"{labels_csv.name} has no 'group' column: every spectrum is treated as independent; if a subject "
             "has several spectra, add a group column or the CV figures will be optimistic")
    extra = unlisted_files(data_dir, table.listed)
    if extra:
        warn(f"{len(extra)} spectra files in {data_dir} are not in {labels_csv.name} and are not used "
             f"(e.g. {', '.join(extra[:3])})")
    rows = existing_rows(table.rows, data_dir, labels_csv, warn)
    task = resolve_task(rows, task, target, labels_csv, warn)
    if task == "regression":
        rows = numeric_rows(rows, target, labels_csv, warn)
    builder = InputBuilder.from_data_config(cfg.data)
    rows, images, feats, vendors, canonical = _load_rows(rows, builder, scfg.baseline_ppm, labels_csv, warn)
    _check_usable(rows, len(table.listed), task, target, labels_csv)
    fit = None
    if scfg.fit_arm:  # a linear-combination fit of every spectrum (~0.1 s each)
        fit = fit_ratio_features(canonical, builder.grid)
    labels, y = _encode(rows, task)
    for c, n in sorted(Counter(r.value for r in rows).items()) if task == "classification" else []:
        if n < scfg.small_class:
            warn(f"class {c!r} has only {n} spectra (< {scfg.small_class}): its figures rest on very few examples")
    return StudyData(
        files=[r.file for r in rows], groups=np.array([r.unit for r in rows], dtype=object), task=task,
        labels=labels, y=y, x=torch.stack(images), features=np.stack(feats), fit_features=fit, grouped=table.grouped, vendors=vendors,
        formats=[_suffix(r.file) for r in rows], warnings=warn.items,
    )


# --------------------------------------------------------------------------- cross-validation
def cv_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int, task: str = "classification") -> np.ndarray:
    """Fold index (0..k-1) of every spectrum: whole groups go to one fold, classes (or target
    quantiles for regression) spread evenly over folds. Seeded; like StratifiedGroupKFold."""
    rng = np.random.default_rng([seed, 0x5EED])
    names, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    sizes = np.bincount(inv)
    if task == "classification":  # a group's stratum: its most common class
        strata = np.array([np.bincount(y[inv == g].astype(int)).argmax() for g in range(len(names))])
    else:  # blocks of k groups with neighbouring mean targets
        means = np.array([float(np.mean(y[inv == g])) for g in range(len(names))])
        order = np.lexsort((rng.random(len(names)), means))
        strata = np.empty(len(names), dtype=int)
        strata[order] = np.arange(len(names)) // k
    fold_of = np.empty(len(names), dtype=int)
    load = np.zeros(k)
    for s in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == s))
        members = members[np.argsort(-sizes[members], kind="stable")]  # big groups first
        count, pref = np.zeros(k), rng.permutation(k)
        for g in members:
            f = min(range(k), key=lambda f: (count[f], load[f], pref[f]))
            fold_of[g] = f
            count[f] += sizes[g]
            load[f] += sizes[g]
    return fold_of[inv]


def fold_limit(y: np.ndarray, groups: np.ndarray, task: str) -> tuple[int, int | None]:
    """(most folds these rows allow, the class that limits it): every class needs a group in every fold."""
    if task == "classification":
        per_class = {int(c): len(set(groups[y == c])) for c in np.unique(y)}
        smallest = min(per_class, key=lambda c: (per_class[c], c))
        return per_class[smallest], smallest
    return len(set(groups)), None


def choose_folds(data: StudyData, requested: int, warn: Log) -> int:
    """k, lowered so every class has a group in every fold (and every fold a group)."""
    what = "subjects/groups" if data.grouped else "spectra"
    groups_per, smallest = fold_limit(data.y, data.groups, data.task)
    reason = (f"class {data.labels[smallest]!r} has only {groups_per} {what}" if smallest is not None
              else f"there are only {groups_per} {what}")
    if groups_per < requested:
        warn(f"{reason}: using {groups_per}-fold instead of {requested}-fold cross-validation")
        return groups_per
    return requested
