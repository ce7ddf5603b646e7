"""Metrics and the statistics of paired seeds: one place for what every evaluation reports
(the benchmark, a study, `mrsfm compare`, the notebook's scripts)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    recalls, f1s = [], []
    for c in range(n_classes):
        tp = np.sum((y_pred == c) & (y_true == c))
        fn = np.sum((y_pred != c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        if tp + fn:
            recalls.append(tp / (tp + fn))
        f1s.append(2 * tp / max(1, 2 * tp + fp + fn))
    return {"accuracy": float(np.mean(y_true == y_pred)), "balanced_accuracy": float(np.mean(recalls)),
            "macro_f1": float(np.mean(f1s))}


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    out = {}
    for j, name in enumerate(names):
        err = y_pred[:, j] - y_true[:, j]
        ss_tot = np.sum((y_true[:, j] - y_true[:, j].mean()) ** 2)
        out[f"mae_{name}"] = float(np.mean(np.abs(err)))
        out[f"r2_{name}"] = float(1 - np.sum(err**2) / max(ss_tot, 1e-12))
    return out


def mean_ci95(values: Sequence[float]) -> dict[str, float]:
    """Mean and the half-width of a Student-t 95% interval over seeds."""
    v = np.asarray(values, dtype=float)
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": half, "n": int(len(v))}
