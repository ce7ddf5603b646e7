"""Fine-tune and evaluate on a study's own labelled spectra (`mrsfm finetune --data DIR --labels CSV`).

Why this shape: a study has tens of labelled spectra, often several per subject. Honest figures
therefore come from stratified k-fold cross-validation, grouped by subject when a `group` column
says which spectra belong together, repeated over seeds. The pretrained encoder, the same encoder
at its initialisation (random_init: what pretraining adds), timm's from-scratch ViT and a non-deep
baseline (logistic / ridge regression on the magnitude spectrum) are scored on the same folds, so
a reader sees whether pretraining, or deep learning at all, helped. A final model is then trained on every usable spectrum and saved for `mrsfm predict`.

Bad rows (missing, unreadable or unlabelled files, duplicates) are dropped with one warning each;
a table that cannot support an honest evaluation is refused with one readable message.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrsfm_model.config import ConfigSection
from mrsfm_model.data.io import load_spectrum, reference_candidates, supported_files
from mrsfm_model.data.stream import InputBuilder
from mrsfm_model.errors import MRSDataError
from mrsfm_model.evaluation.finetune import (
    FinetuneConfig,
    architecture,
    arm_start,
    classification_metrics,
    mean_ci95,
    network_outputs,
    regression_metrics,
    train_model,
)
from mrsfm_model.evaluation.linear import fit_predict
from mrsfm_model.evaluation.predict import save_study_model
from mrsfm_model.evaluation.tasks import spectrum_features
from mrsfm_model.logs import Log, get_logger
from mrsfm_model.model.mae import MAEConfig
from mrsfm_model.reports.cards import read_card

TASKS = ("classification", "regression")
MISSING_VALUES = {"", "nan", "na", "n/a", "null", "none", "?"}
METRICS = {"classification": ("accuracy", "balanced_accuracy", "macro_f1"), "regression": ("mae", "r2")}
HEADLINE_METRIC = {"classification": "balanced_accuracy", "regression": "r2"}
_log = get_logger("evaluation")


# --------------------------------------------------------------------------- settings
@dataclass
class StudyConfig(ConfigSection):
    """A study's CV settings; values (and their reasons) in configs/study/default.yaml."""

    SECTION = "study"
    folds: int
    seeds: tuple[int, ...]
    mode: str  # full | linear
    steps: int
    batch_size: int
    baseline_l2: float
    baseline_ppm: tuple[float, float]
    small_class: int

    def check(self) -> None:
        if self.folds < 2 or not self.seeds or self.mode not in ("full", "linear") or self.steps < 1:
            raise ValueError(f"config study: need folds >= 2, at least one seed, mode full|linear and steps >= 1, "
                             f"got folds={self.folds} seeds={list(self.seeds)} mode={self.mode} steps={self.steps}")

    def finetune(self, cfg) -> FinetuneConfig:
        """The shared fine-tuning settings with this study's mode, steps and batch size."""
        base = dict(cfg.get("finetune") or {})
        return FinetuneConfig.from_config({**base, "mode": self.mode, "steps": self.steps,
                                           "batch_size": self.batch_size})


class Warnings:
    """Collects warnings for the JSON and prints each as one `warning: ...` line."""

    def __init__(self, log: Log):
        self.log, self.items = log, []

    def __call__(self, msg: str) -> None:
        self.items.append(msg)
        self.log(f"warning: {msg}")


# --------------------------------------------------------------------------- labels.csv
@dataclass
class LabelRow:
    line: int  # line number in labels.csv (header = line 1)
    file: str  # as written in labels.csv
    path: Path
    value: str
    group: str  # as written; "" when none

    @property
    def unit(self) -> str:
        """The group CV keeps together: the given group, else the file itself."""
        return self.group or f"file:{self.file}"


def _read_table(labels_csv: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line, fields) of every non-blank row; delimiter , ; or tab (spreadsheet exports)."""
    if not labels_csv.is_file():
        raise MRSDataError(labels_csv, "labels file not found")
    try:
        text = labels_csv.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise MRSDataError(labels_csv, "not a UTF-8 text CSV file (spreadsheets: save as 'CSV UTF-8')") from None
    if not text.strip():
        raise MRSDataError(labels_csv, "is empty; expected a header line such as 'file,group,diagnosis' "
                                       "and one row per spectrum")
    first = text.lstrip().splitlines()[0]
    delimiter = max(",;\t", key=first.count) if any(d in first for d in ",;\t") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    lines = []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                lines.append((reader.line_num, row))
    except csv.Error as exc:
        raise MRSDataError(labels_csv, f"not a readable CSV file (line {reader.line_num}: {exc})") from None
    header = [h.strip() for h in lines[0][1]]
    return header, lines[1:]


def _check_columns(labels_csv: Path, header: list[str], target: str) -> None:
    dupes = sorted(h for h, n in Counter(header).items() if n > 1)
    if dupes:
        raise MRSDataError(labels_csv, f"column names appear twice: {', '.join(dupes)}")
    label_cols = [h for h in header if h not in ("file", "group") and h]
    if "file" not in header:
        raise MRSDataError(labels_csv, f"no 'file' column (columns: {', '.join(header)}); one column must be "
                                       "'file' with each spectrum's path relative to the data folder")
    if target in ("file", "group"):
        raise MRSDataError(labels_csv, f"the target must be a label column, not {target!r} "
                                       f"(label columns: {', '.join(label_cols) or 'none'})")
    if target not in header:
        close = difflib.get_close_matches(target, label_cols, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise MRSDataError(labels_csv, f"no column {target!r}; label columns: {', '.join(label_cols) or 'none'}{hint}")


@dataclass
class LabelTable:
    rows: list[LabelRow]  # labelled, not duplicated (files not yet checked)
    grouped: bool  # labels.csv has a group column
    listed: set[Path]  # every file it names, usable or not

    def __len__(self) -> int:
        return len(self.rows)


def read_labels(labels_csv: Path, data_dir: Path, target: str, warn: Log) -> LabelTable:
    """The labelled, de-duplicated rows of labels.csv; each dropped row gets one warning."""
    header, lines = _read_table(labels_csv)
    _check_columns(labels_csv, header, target)
    if not lines:
        raise MRSDataError(labels_csv, "has a header but no rows")
    col = {h: i for i, h in enumerate(header)}
    grouped = "group" in col
    rows: list[LabelRow] = []
    listed: set[Path] = set()
    for line, fields in lines:
        if len(fields) > len(header) and any(f.strip() for f in fields[len(header):]):
            warn(f"{labels_csv.name} line {line}: {len(fields)} fields but the header has {len(header)}; row dropped")
            continue
        fields = [f.strip() for f in fields] + [""] * (len(header) - len(fields))
        name, value = fields[col["file"]], fields[col[target]]
        listed.add((data_dir / name).resolve())
        if not name:
            warn(f"{labels_csv.name} line {line}: empty 'file'; row dropped")
            continue
        if value.lower() in MISSING_VALUES:
            warn(f"{labels_csv.name} line {line} ({name}): no value for {target!r} ({value or 'empty'}); row dropped")
            continue
        group = fields[col["group"]] if grouped else ""
        if grouped and not group:
            warn(f"{labels_csv.name} line {line} ({name}): empty group; treated as a group of its own")
        rows.append(LabelRow(line, name, data_dir / name, value, group))
    return LabelTable(_drop_duplicates(rows, labels_csv, warn), grouped, listed)


def _drop_duplicates(rows: list[LabelRow], labels_csv: Path, warn: Log) -> list[LabelRow]:
    """A file listed twice: the repeat is ignored when it agrees, every copy dropped when it does not."""
    by_path: dict[Path, list[LabelRow]] = {}
    for r in rows:
        by_path.setdefault(r.path.resolve(), []).append(r)
    bad: set[int] = set()
    for copies in (c for c in by_path.values() if len(c) > 1):
        first = copies[0]
        lines = ", ".join(str(c.line) for c in copies)
        if len({(c.value, c.group) for c in copies}) == 1:
            warn(f"{labels_csv.name}: file {first.file!r} is listed {len(copies)} times (lines {lines}); "
                 f"the repeats are ignored")
            bad |= {c.line for c in copies[1:]}
        else:
            found = ", ".join(repr(c.value) for c in copies)
            warn(f"{labels_csv.name}: file {first.file!r} is listed {len(copies)} times (lines {lines}) with "
                 f"different labels or groups ({found}); all its rows dropped")
            bad |= {c.line for c in copies}
    return [r for r in rows if r.line not in bad]


def _existing(rows: list[LabelRow], data_dir: Path, labels_csv: Path, warn: Log) -> list[LabelRow]:
    out = []
    for r in rows:
        if r.path.is_file():
            out.append(r)
        else:
            what = "is a folder, not a file" if r.path.is_dir() else f"not found in {data_dir}"
            warn(f"{labels_csv.name} line {r.line}: file {r.file!r} {what}; row dropped")
    return out


def _unlisted(data_dir: Path, listed: set[Path]) -> list[str]:
    """Spectra files in DIR that labels.csv does not name (water references of named files aside)."""

    refs = {c.resolve() for p in listed if p.is_file() for c in reference_candidates(p)}
    return [str(f.relative_to(data_dir)) for f in supported_files(data_dir) if f.resolve() not in listed | refs]


# --------------------------------------------------------------------------- task and targets
def _number(value: str) -> float | None:
    try:
        out = float(value)
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def resolve_task(rows: list[LabelRow], task: str | None, target: str, labels_csv: Path, warn: Log) -> str:
    """Categorical target -> classification, numeric -> regression, unless `task` says otherwise."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    numbers = [_number(r.value) for r in rows]
    if task is None:
        task = "regression" if rows and all(n is not None for n in numbers) else "classification"
        distinct = {n for n in numbers if n is not None}
        if task == "regression" and len(distinct) <= 10 and all(float(n).is_integer() for n in distinct):
            warn(f"{target!r} holds only the numbers {sorted(int(n) for n in distinct)}: treated as a number "
                 f"(regression); if these are class codes, use task classification (--task classification)")
        others = [r.value for r, n in zip(rows, numbers) if n is None]
        if task == "classification" and others and len(others) <= 0.2 * len(rows):
            warn(f"{target!r} is mostly numbers but {len(others)} values are not (e.g. {others[0]!r}): treated as "
                 "class names; use task regression (--task regression) to drop those rows instead")
    if task == "classification":
        by_case: dict[str, set[str]] = {}
        for r in rows:
            by_case.setdefault(r.value.casefold(), set()).add(r.value)
        for names in (sorted(v) for v in by_case.values() if len(v) > 1):
            warn(f"labels {', '.join(map(repr, names))} of {target!r} differ only in letter case: "
                 "they are treated as different classes")
    elif task == "regression" and rows and not any(n is not None for n in numbers):
        raise MRSDataError(labels_csv, f"task regression needs numbers in {target!r}, found e.g. {rows[0].value!r}")
    return task


def _numeric_rows(rows: list[LabelRow], target: str, labels_csv: Path, warn: Log) -> list[LabelRow]:
    out = []
    for r in rows:
        if _number(r.value) is None:
            warn(f"{labels_csv.name} line {r.line} ({r.file}): {target!r} = {r.value!r} is not a number; row dropped")
        else:
            out.append(r)
    return out


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
               warn: Log) -> tuple[list[LabelRow], list, list[np.ndarray], list[str]]:

    kept, images, feats, vendors = [], [], [], []
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
    return kept, images, feats, vendors


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
    extra = _unlisted(data_dir, table.listed)
    if extra:
        warn(f"{len(extra)} spectra files in {data_dir} are not in {labels_csv.name} and are not used "
             f"(e.g. {', '.join(extra[:3])})")
    rows = _existing(table.rows, data_dir, labels_csv, warn)
    task = resolve_task(rows, task, target, labels_csv, warn)
    if task == "regression":
        rows = _numeric_rows(rows, target, labels_csv, warn)
    builder = InputBuilder.from_data_config(cfg.data)
    rows, images, feats, vendors = _load_rows(rows, builder, scfg.baseline_ppm, labels_csv, warn)
    _check_usable(rows, len(table.listed), task, target, labels_csv)
    labels, y = _encode(rows, task)
    for c, n in sorted(Counter(r.value for r in rows).items()) if task == "classification" else []:
        if n < scfg.small_class:
            warn(f"class {c!r} has only {n} spectra (< {scfg.small_class}): its figures rest on very few examples")
    return StudyData(
        files=[r.file for r in rows], groups=np.array([r.unit for r in rows], dtype=object), task=task,
        labels=labels, y=y, x=torch.stack(images), features=np.stack(feats), grouped=table.grouped, vendors=vendors,
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


def choose_folds(data: StudyData, requested: int, warn: Log) -> int:
    """k, lowered so every class has a group in every fold (and every fold a group)."""
    groups_per = len(set(data.groups))
    what = "subjects/groups" if data.grouped else "spectra"
    if data.task == "classification":
        per_class = {data.labels[c]: len(set(data.groups[data.y == c])) for c in range(data.n_classes)}
        smallest, groups_per = min(per_class.items(), key=lambda kv: kv[1])
        reason = f"class {smallest!r} has only {groups_per} {what}"
    else:
        reason = f"there are only {groups_per} {what}"
    if groups_per < requested:
        warn(f"{reason}: using {groups_per}-fold instead of {requested}-fold cross-validation")
        return groups_per
    return requested


# --------------------------------------------------------------------------- the three arms
def baseline_fit_predict(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, task: str,
                         n_classes: int, l2: float) -> np.ndarray:
    """Multinomial logistic regression (class probabilities) or ridge regression (values) on
    standardised features, L2 penalty `l2` on the mean loss (mrsfm_model.evaluation.linear). The yardstick a
    deep model must beat."""
    return fit_predict(f_train, y_train, f_test, task, n_classes, l2)


@dataclass
class DeepSetup:
    """What a deep arm needs besides the data."""

    encoder: Path | None
    mae_cfg: MAEConfig
    ft: FinetuneConfig
    device: torch.device


def train_deep(x: torch.Tensor, y: np.ndarray, task: str, n_classes: int, setup: DeepSetup,
               seed: int) -> tuple[torch.nn.Module, dict[str, float]]:
    """The shared `train_model`; regression targets standardised (stats returned to undo it)."""
    if task == "classification":
        model = train_model(x, torch.from_numpy(y).long(), task, n_classes, setup.encoder, setup.mae_cfg, setup.ft,
                            seed, setup.device)
        return model, {}
    stats = {"mean": float(y.mean()), "std": float(max(y.std(), 1e-6))}
    yt = torch.from_numpy((y - stats["mean"]) / stats["std"]).float()[:, None]
    return train_model(x, yt, task, 1, setup.encoder, setup.mae_cfg, setup.ft, seed, setup.device), stats


def deep_outputs(model: torch.nn.Module, x: torch.Tensor, task: str, stats: dict[str, float],
                 device: torch.device) -> np.ndarray:
    out = network_outputs(model, x, device)
    if task == "classification":
        return torch.softmax(out, 1).numpy()
    return out[:, 0].numpy() * stats["std"] + stats["mean"]


def _scores(y: np.ndarray, out: np.ndarray, task: str, n_classes: int) -> dict[str, float]:
    if task == "classification":
        return classification_metrics(y, out.argmax(1), n_classes)
    m = regression_metrics(y[:, None], out[:, None], ["t"])
    return {"mae": m["mae_t"], "r2": m["r2_t"] if np.ptp(y) > 0 else float("nan")}  # R² needs spread


def evaluate_arm(arm: str, data: StudyData, folds: dict[int, np.ndarray], k: int, setup: DeepSetup,
                 scfg: StudyConfig, log: Log) -> dict[str, Any]:
    """Out-of-fold predictions of one arm for every seed -> pooled metrics per seed, their mean
    and 95% interval, per-fold metrics, and (classification) the confusion matrix over all folds."""
    per_seed, per_fold = [], []
    confusion = np.zeros((data.n_classes, data.n_classes), dtype=np.int64)
    for seed, fold in folds.items():
        oof = np.zeros((len(data), data.n_classes)) if data.task == "classification" else np.zeros(len(data))
        for f in range(k):
            tr, te = fold != f, fold == f
            if arm == "baseline":
                oof[te] = baseline_fit_predict(data.features[tr], data.y[tr], data.features[te], data.task,
                                               data.n_classes, scfg.baseline_l2)
            else:
                arm_setup = DeepSetup(arm_start(arm, setup.encoder), setup.mae_cfg, setup.ft, setup.device)
                model, stats = train_deep(data.x[tr], data.y[tr], data.task, data.n_classes, arm_setup,
                                          seed * 1000 + f)
                oof[te] = deep_outputs(model, data.x[te], data.task, stats, setup.device)
            per_fold.append({"seed": seed, "fold": f, "n_test": int(te.sum()),
                             **_scores(data.y[te], oof[te], data.task, data.n_classes)})
        per_seed.append(_scores(data.y, oof, data.task, data.n_classes))
        if data.task == "classification":
            np.add.at(confusion, (data.y, oof.argmax(1)), 1)
        key = HEADLINE_METRIC[data.task]
        log(f"  {arm:<10} seed {seed}: {key} {per_seed[-1][key]:.3f}")
    result = {"metrics": {m: mean_ci95([s[m] for s in per_seed]) for m in METRICS[data.task]},
              "per_seed": per_seed, "per_fold": per_fold}
    if data.task == "classification":
        result["confusion"] = confusion.tolist()
    return result


# --------------------------------------------------------------------------- encoder and architecture
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encoder_provenance(encoder: Path | None) -> dict[str, Any]:
    """Which weights the model started from: file, checksum and the encoder's own model card."""
    if encoder is None:
        return {"init": "random (no --encoder)"}
    return {"init": "pretrained", "path": str(encoder.resolve()), "sha256": _sha256(encoder), "card": read_card(encoder)}


# --------------------------------------------------------------------------- report
def print_table(arms: dict[str, dict], task: str, log: Log) -> None:
    metrics = METRICS[task]
    log(f"{'arm':<12}" + "".join(f"{m:>22}" for m in metrics))
    for arm, res in arms.items():
        cells = [f"{res['metrics'][m]['mean']:.3f} ± {res['metrics'][m]['ci95']:.3f}" for m in metrics]
        log(f"{arm:<12}" + "".join(f"{c:>22}" for c in cells))


def plot_confusion(matrix: np.ndarray, labels: list[str], title: str, out: Path) -> Path:
    from mrsfm_model.reports.plots import plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 1.0 + 0.8 * n))
    ax.imshow(matrix, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def data_summary(data: StudyData) -> dict[str, Any]:
    out: dict[str, Any] = {"spectra": len(data), "groups": len(set(data.groups)), "grouped": data.grouped,
                           "vendors": dict(Counter(data.vendors)), "formats": dict(Counter(data.formats))}
    if data.task == "classification":
        counts = np.bincount(data.y, minlength=data.n_classes)
        out["class_counts"] = {data.labels[c]: int(n) for c, n in enumerate(counts)}
    else:
        out["target_stats"] = _target_stats(data.y)
    return out


def _target_stats(y: np.ndarray) -> dict[str, float]:
    return {"mean": float(y.mean()), "std": float(y.std()), "min": float(y.min()), "max": float(y.max())}


def _compare_note(arms: dict[str, dict], headline: str, task: str) -> str | None:
    key = HEADLINE_METRIC[task]
    base, head = arms["baseline"]["metrics"][key]["mean"], arms[headline]["metrics"][key]["mean"]
    if base >= head:
        return (f"the non-deep baseline scored {key} {base:.3f}, not below the {headline} ViT's {head:.3f}: "
                "with this data the deep model adds nothing measurable")
    return None


# --------------------------------------------------------------------------- the command
def _final_model(data: StudyData, setup: DeepSetup, seed: int, log: Log) -> tuple[torch.nn.Module, dict[str, float]]:
    log(f"training the final model on all {len(data)} spectra")
    return train_deep(data.x, data.y, data.task, data.n_classes, setup, seed)


def run_study(cfg, encoder: Path | None, data_dir: Path, labels_csv: Path, target: str, out_dir: Path,
              device: torch.device | str, task: str | None = None, log: Log = _log.info) -> dict[str, Any]:
    """Evaluate (grouped stratified k-fold CV x seeds; pretrained / random_init / scratch / baseline), then train
    and save the final model. Writes study.json, confusion.png (classification), model.safetensors
    + model.json under out_dir; returns the study.json content."""
    t0 = time.perf_counter()
    scfg = StudyConfig.from_config(cfg.get("study"))
    encoder = Path(encoder) if encoder else None
    device, out_dir = torch.device(device), Path(out_dir)
    builder = InputBuilder.from_data_config(cfg.data)
    warn = Warnings(log)
    setup = DeepSetup(encoder, architecture(cfg, encoder, builder), scfg.finetune(cfg), device)
    data = load_study(cfg, data_dir, labels_csv, target, task, log=log)
    warn.items[:0] = data.warnings
    k = choose_folds(data, scfg.folds, warn)
    folds = {s: cv_folds(data.y, data.groups, k, s, data.task) for s in scfg.seeds}
    log(f"{data.task} of {target!r}: {len(data)} spectra, {len(set(data.groups))} groups, {k}-fold CV x "
        f"{len(scfg.seeds)} seeds")
    headline = "pretrained" if encoder else "scratch"
    names = (["pretrained", "random_init"] if encoder else []) + ["scratch", "baseline"]
    arms = {a: evaluate_arm(a, data, folds, k, setup, scfg, log) for a in names}
    note = _compare_note(arms, headline, data.task)
    if note:
        warn(note)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = _result(scfg, setup, data, target, k, folds, arms, headline, warn.items)
    if data.task == "classification":
        title = f"{headline}: {k}-fold CV x {len(scfg.seeds)} seeds (counts summed)"
        plot_confusion(np.array(arms[headline]["confusion"]), data.labels, title, out_dir / "confusion.png")
        result["confusion_png"] = str(out_dir / "confusion.png")
    print_table(arms, data.task, log)
    model, stats = _final_model(data, setup, scfg.seeds[0], log)
    result["model"] = str(_save_final(model, stats, result, setup, builder, scfg, out_dir / "model.safetensors"))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "study.json").write_text(json.dumps(_jsonable(result), indent=1, default=str))
    log(f"wrote {out_dir / 'study.json'} and the final model {result['model']}")
    return result


def _jsonable(obj: Any) -> Any:
    """NaN (a 95% interval from one seed) as null, so strict JSON readers accept the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _result(scfg: StudyConfig, setup: DeepSetup, data: StudyData, target: str, k: int, folds: dict[int, np.ndarray],
            arms: dict[str, dict], headline: str, warnings: list[str]) -> dict[str, Any]:
    return {
        "target": target, "task": data.task, "labels": data.labels,
        "encoder": encoder_provenance(setup.encoder), "headline": headline, "mode": scfg.mode,
        "data": data_summary(data),
        "files": data.files, "groups": [str(g) for g in data.groups],
        "cv": {"folds": k, "requested_folds": scfg.folds, "seeds": list(scfg.seeds), "grouped": data.grouped,
               "assignments": {str(s): f.tolist() for s, f in folds.items()},
               "note": "metrics pool each seed's out-of-fold predictions; the 95% interval is over seeds, so it "
                       "reflects split and training randomness, not the sampling uncertainty of a small study"},
        "arms": arms, "warnings": warnings,
        "training": {**asdict(setup.ft), "baseline_l2": scfg.baseline_l2, "baseline_ppm": list(scfg.baseline_ppm)},
    }


def _save_final(model: torch.nn.Module, stats: dict[str, float], result: dict[str, Any], setup: DeepSetup,
                builder: InputBuilder, scfg: StudyConfig, path: Path) -> Path:
    meta = {"task": result["task"], "target": result["target"], "labels": result["labels"], "mode": scfg.mode,
            "global_pool": setup.ft.global_pool, "target_stats": stats, "mae_config": setup.mae_cfg.to_dict(),
            "inputs": builder.to_dict()}
    headline = result["arms"][result["headline"]]["metrics"]
    card = {
        "format": "mrsfm-study-model-v1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "purpose": f"{result['task']} of {result['target']!r} from MRS spectrograms",
        **meta, "encoder": result["encoder"], "data": result["data"],
        "cv": {"folds": result["cv"]["folds"], "seeds": result["cv"]["seeds"], "grouped": result["cv"]["grouped"],
               "headline_arm": result["headline"], "headline": headline,
               "all_arms": {a: r["metrics"] for a, r in result["arms"].items()}, "note": result["cv"]["note"]},
        "training": {**result["training"], "trained_on": result["data"]["spectra"], "seed": scfg.seeds[0]},
        "warnings": result["warnings"],
    }
    return save_study_model(model, path, meta, _jsonable(card))


__all__ = ["StudyConfig", "StudyData", "run_study", "load_study", "read_labels", "cv_folds", "choose_folds",
           "baseline_fit_predict", "evaluate_arm", "spectral_features"]
