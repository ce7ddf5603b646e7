"""Fine-tune and evaluate on a study's own labelled spectra (`mrsfm finetune --data DIR --labels CSV`).

Why this shape: a study has tens of labelled spectra, often several per subject. Honest figures
therefore come from stratified k-fold cross-validation, grouped by subject when a `group` column
says which spectra belong together, repeated over seeds. The pretrained encoder, the same encoder
at its initialisation (random_init: what pretraining adds), timm's from-scratch ViT and a non-deep
baseline (logistic / ridge regression on the magnitude spectrum) are scored on the same folds, and
so is what MRS users do today (`fit`: a linear-combination fit of each spectrum, then logistic /
ridge regression on its fitted metabolite ratios), so a reader sees whether pretraining, or deep
learning at all, helped. A final model is then trained on every usable spectrum and saved for `mrsfm predict`.

Bad rows (missing, unreadable or unlabelled files, duplicates) are dropped with one warning each;
a table that cannot support an honest evaluation is refused with one readable message.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrsfm_model.data.stream import InputBuilder
from mrsfm_model.evaluation.finetune import FinetuneConfig, train_model
from mrsfm_model.evaluation.labels import Warnings, read_labels
from mrsfm_model.evaluation.linear import Penalty, as_grid, fit_predict, penalty_cv
from mrsfm_model.evaluation.networks import architecture, arm_start, fit_readout, frozen_network, network_outputs
from mrsfm_model.evaluation.predict import save_study_model
from mrsfm_model.evaluation.stats import classification_metrics, mean_ci95, regression_metrics
from mrsfm_model.evaluation.study_data import (
    StudyConfig,
    StudyData,
    choose_folds,
    cv_folds,
    load_study,
    spectral_features,
)
from mrsfm_model.logs import Log, get_logger
from mrsfm_model.model.mae import MAEConfig
from mrsfm_model.reports.cards import read_card

METRICS = {"classification": ("accuracy", "balanced_accuracy", "macro_f1"), "regression": ("mae", "r2")}
HEADLINE_METRIC = {"classification": "balanced_accuracy", "regression": "r2"}
_log = get_logger("evaluation")


# --------------------------------------------------------------------------- settings
# --------------------------------------------------------------------------- the three arms
def baseline_fit_predict(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, task: str,
                         n_classes: int, l2: Penalty, groups: np.ndarray | None = None) -> np.ndarray:
    """Multinomial logistic regression (class probabilities) or ridge regression (values) on
    standardised features, L2 penalty `l2` (or chosen from a grid by inner CV) on the mean loss (mrsfm_model.evaluation.linear). The yardstick a
    deep model must beat. `groups`: the training rows' subjects, so the penalty's inner CV keeps
    each subject's scans together."""
    return fit_predict(f_train, y_train, f_test, task, n_classes, l2, groups)


@dataclass
class DeepSetup:
    """What a deep arm needs besides the data. `choose`: the frozen read-outs study mode `auto`
    picks from (by an inner CV on the training rows); empty for a fixed mode."""

    encoder: Path | None
    mae_cfg: MAEConfig
    ft: FinetuneConfig
    device: torch.device
    choose: tuple[str, ...] = ()


def train_deep(x: torch.Tensor, y: np.ndarray, task: str, n_classes: int, setup: DeepSetup, seed: int,
               groups: np.ndarray | None = None) -> tuple[torch.nn.Module, dict[str, float], str]:
    """The shared `train_model` (or, in mode auto, the read-out `choose_readout` picks); regression
    targets standardised (stats returned to undo it). Returns (model, stats, the mode it used)."""
    stats = {} if task == "classification" else {"mean": float(y.mean()), "std": float(max(y.std(), 1e-6))}
    n_out = n_classes if task == "classification" else 1
    yt = (torch.from_numpy(y).long() if task == "classification"
          else torch.from_numpy((y - stats["mean"]) / stats["std"]).float()[:, None])
    if setup.choose:
        model, mode = choose_readout(x, y, yt, np.arange(len(y)) if groups is None else groups, task, n_out,
                                     setup, seed)
        return model, stats, mode
    return train_model(x, yt, task, n_out, setup.encoder, setup.mae_cfg, setup.ft, seed, setup.device), stats, \
        setup.ft.mode


def choose_readout(x: torch.Tensor, y: np.ndarray, yt: torch.Tensor, groups: np.ndarray, task: str, n_out: int,
                   setup: DeepSetup, seed: int) -> tuple[torch.nn.Module, str]:
    """Mode auto: score each frozen read-out in `setup.choose` by the grouped inner CV that also
    picks its penalty (`penalty_cv`, on these training rows alone), then fit the best on all of
    them with its penalty. Why: the latent head's estimates carry the chemistry (concentration
    differences) and the band tokens the acquisition (vendor); which one a study's target needs is
    measured on its own training data, never on its test fold. One CV, not one nested in another:
    each fold's penalty search inside a read-out's CV cost ~10x for the same choice."""
    best: tuple[float, str, torch.nn.Module, np.ndarray, float] | None = None
    for readout in setup.choose:
        torch.manual_seed(seed)
        net = frozen_network(setup.encoder, setup.mae_cfg, readout, setup.ft.global_pool, n_out)
        feats = network_outputs(net, x, setup.device).numpy()
        target = y if task == "classification" else y.reshape(len(y), -1)
        l2, score = penalty_cv(feats, target, task, n_out, as_grid(setup.ft.l2), groups=groups)
        score = 0.0 if np.isnan(score) else score
        if best is None or score > best[0]:
            best = (score, readout, net, feats, l2)
    _, readout, net, feats, l2 = best
    return fit_readout(net, x, yt, task, n_out, l2, setup.device, feats=feats), readout


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
            if arm in ("baseline", "fit"):
                feats = data.features if arm == "baseline" else data.fit_features
                oof[te] = baseline_fit_predict(feats[tr], data.y[tr], feats[te], data.task, data.n_classes,
                                               setup.ft.l2, data.groups[tr])
            else:
                arm_setup = DeepSetup(arm_start(arm, setup.encoder), setup.mae_cfg, setup.ft, setup.device,
                                      setup.choose)
                model, stats, mode = train_deep(data.x[tr], data.y[tr], data.task, data.n_classes, arm_setup,
                                                seed * 1000 + f, data.groups[tr])
                oof[te] = deep_outputs(model, data.x[te], data.task, stats, setup.device)
            per_fold.append({"seed": seed, "fold": f, "n_test": int(te.sum()),
                             **({} if arm in ("baseline", "fit") else {"mode": mode}),
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
    head = arms[headline]["metrics"][key]["mean"]
    names = {"baseline": "the non-deep baseline (spectra)", "fit": "the fit-then-regress arm (fitted ratios)"}
    best = max((a for a in names if a in arms), key=lambda a: arms[a]["metrics"][key]["mean"])
    base = arms[best]["metrics"][key]["mean"]
    if base >= head:
        return (f"{names[best]} scored {key} {base:.3f}, not below the {headline} ViT's {head:.3f}: "
                "with this data the deep model adds nothing measurable")
    return None


# --------------------------------------------------------------------------- the command
def _final_model(data: StudyData, setup: DeepSetup, seed: int,
                 log: Log) -> tuple[torch.nn.Module, dict[str, float], str]:
    log(f"training the final model on all {len(data)} spectra")
    return train_deep(data.x, data.y, data.task, data.n_classes, setup, seed, data.groups)


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
    mae_cfg = architecture(cfg, encoder, builder)
    setup = DeepSetup(encoder, mae_cfg, scfg.finetune(cfg), device, scfg.readouts(mae_cfg, encoder))
    data = load_study(cfg, data_dir, labels_csv, target, task, log=log)
    warn.items[:0] = data.warnings
    k = choose_folds(data, scfg.folds, warn)
    folds = {s: cv_folds(data.y, data.groups, k, s, data.task) for s in scfg.seeds}
    log(f"{data.task} of {target!r}: {len(data)} spectra, {len(set(data.groups))} groups, {k}-fold CV x "
        f"{len(scfg.seeds)} seeds")
    headline = "pretrained" if encoder else "scratch"
    names = (["pretrained", "random_init"] if encoder else []) + ["scratch", "baseline"]
    names += ["fit"] if data.fit_features is not None else []
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
    model, stats, mode = _final_model(data, setup, scfg.seeds[0], log)
    result["final_mode"] = mode
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
        "training": {**asdict(setup.ft), "baseline_ppm": list(scfg.baseline_ppm)},
    }


def _save_final(model: torch.nn.Module, stats: dict[str, float], result: dict[str, Any], setup: DeepSetup,
                builder: InputBuilder, scfg: StudyConfig, path: Path) -> Path:
    meta = {"task": result["task"], "target": result["target"], "labels": result["labels"], "mode": result["final_mode"],
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
