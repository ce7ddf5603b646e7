"""Regularised linear models on standardised features: the non-deep baselines and the linear probe.

One estimator for both, so "pretrained features vs pixels" compares representations, not fitting
procedures: multinomial logistic regression or ridge regression, L2 penalty `l2` on the mean
loss, features standardised on the training set. Both are solved in the span of the training rows
(the labelled sets are far smaller than the feature count: 100 rows against up to 6 144 features),
which gives the full solution at a fraction of the cost.

The penalty is chosen, not fixed: given several (`finetune.l2`, the same grid for every arm), an
inner stratified cross-validation on the labelled rows alone picks the one with the best held-out
accuracy (classification; log-loss breaks ties) or squared error (regression); a fixed penalty flattered whichever arm it
happened to suit. The fit comes back as a torch module, BatchNorm (no affine, its running
statistics = the training mean and variance) followed by a Linear layer, so it can be saved, and
can start a full fine-tune as the head of a ViT (LP-FT).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

Penalty = float | Sequence[float]  # one L2 penalty, or a grid to choose from by inner CV


def _standardise(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu, sd = a.mean(0), a.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    return (a - mu) / sd, mu, sd


def _basis(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z, v): the standardised rows in the basis of their own span, a = z v^T. With fewer rows
    than features every L2-penalised weight lies in that span, so the fit on z (n columns) equals
    the fit on a (d columns): weight = weight_z v^T, ||weight|| = ||weight_z||. Computed from the
    n x n Gram matrix (13x faster than a thin SVD at 80 x 6 144); directions with a singular value
    under 1e-6 of the largest are dropped (at the smallest penalty of the grid they would carry
    weight ~1e-12 of the rest)."""
    if a.shape[0] > a.shape[1]:
        lam, v = np.linalg.eigh(a.T @ a)
        keep = lam > lam.max(initial=0.0) * 1e-12
        return a @ v[:, keep], v[:, keep]
    lam, u = np.linalg.eigh(a @ a.T)
    keep = lam > lam.max(initial=0.0) * 1e-12
    sv = np.sqrt(lam[keep])
    return u[:, keep] * sv, (a.T @ u[:, keep]) / sv


def _fit_z(z: np.ndarray, y: np.ndarray, task: str, n_out: int, l2: float,
           start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(weight_z (outputs, m), bias) of ridge / multinomial logistic regression on `z`, penalty
    `l2` on the mean loss. `start`: warm start ((outputs, m + 1), a neighbouring penalty's fit)."""
    n, m = z.shape
    if task == "regression":
        yv = y.reshape(n, -1)
        y_mu = yv.mean(0)
        w = np.linalg.solve(z.T @ z + n * l2 * np.eye(m), z.T @ (yv - y_mu))
        return w.T, y_mu
    return _newton_logistic(z, np.asarray(y, dtype=np.int64), n_out, l2, start)


def _newton_logistic(z: np.ndarray, y: np.ndarray, n_out: int, l2: float, start: np.ndarray | None = None,
                     tol: float = 1e-10, most: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by damped Newton steps (the problem has only outputs x
    (m + 1) unknowns once in the row basis, so the exact Hessian is cheap and a few steps converge)."""
    n, m = z.shape
    x = np.concatenate([z, np.ones((n, 1))], axis=1)
    onehot = np.eye(n_out)[y]
    reg = np.full(m + 1, 2 * l2)
    reg[m] = 1e-9  # the bias is not penalised (the tiny term fixes softmax's shift freedom)
    theta = np.zeros((n_out, m + 1)) if start is None else start.copy()

    def objective(t: np.ndarray) -> tuple[float, np.ndarray]:
        logits = x @ t.T
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return float(-(onehot * logp).sum() / n + l2 * (t[:, :m] ** 2).sum()), np.exp(logp)

    f, p = objective(theta)
    for _ in range(most):
        grad = (p - onehot).T @ x / n + theta * reg
        s = p[:, :, None] * np.eye(n_out)[None] - p[:, :, None] * p[:, None, :]
        hess = np.block([[x.T @ (x * s[:, c, d, None]) for d in range(n_out)] for c in range(n_out)]) / n
        hess += np.diag(np.tile(reg, n_out))
        step = np.linalg.solve(hess, grad.ravel()).reshape(theta.shape)
        decrement = float((grad * step).sum())
        if decrement < tol:
            break
        t = 1.0
        while True:  # backtracking (Armijo)
            f_new, p_new = objective(theta - t * step)
            if f_new <= f - 0.25 * t * decrement or t < 1e-8:
                break
            t *= 0.5
        theta, f, p = theta - t * step, f_new, p_new
    return theta[:, :m], theta[:, m]


def _solve(a: np.ndarray, y: np.ndarray, task: str, n_out: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight (outputs, d), bias) for standardised rows `a`."""
    z, v = _basis(a)
    w, bias = _fit_z(z, y, task, n_out, l2)
    return w @ v.T, bias


def inner_folds(y: np.ndarray, task: str, most: int = 10, seed: int = 0,
                groups: np.ndarray | None = None) -> np.ndarray:
    """Fold index per row: stratified by class (classification), at most `most` folds and no more
    than the smallest class has rows; plain seeded folds for regression. With `groups` (a study's
    subjects) whole groups go to one fold, each stratified by its most common class: scans of one
    subject in both the fitting and the held-out rows would reward memorising the subject."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        _, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        strata = (np.array([np.bincount(np.asarray(y)[inv == g].astype(int)).argmax() for g in range(inv.max() + 1)])
                  if task == "classification" else np.zeros(inv.max() + 1, dtype=np.int64))
        return inner_folds(strata, task if task == "classification" else "regression", most, seed)[inv]
    fold = np.empty(len(y), dtype=np.int64)
    if task == "classification":
        classes, counts = np.unique(y, return_counts=True)
        k = max(2, min(most, int(counts.min())))
        for c in classes:
            rows = rng.permutation(np.flatnonzero(y == c))
            fold[rows] = np.arange(len(rows)) % k
        return fold
    fold[rng.permutation(len(y))] = np.arange(len(y)) % min(most, len(y))
    return fold


def choose_l2(f: np.ndarray, y: np.ndarray, task: str, n_out: int, grid: Sequence[float], repeats: int = 3,
              groups: np.ndarray | None = None) -> float:
    """The penalty of `grid` with the best inner-CV score on these rows alone (`penalty_cv`)."""
    return penalty_cv(f, y, task, n_out, grid, repeats, groups)[0]


def penalty_cv(f: np.ndarray, y: np.ndarray, task: str, n_out: int, grid: Sequence[float], repeats: int = 3,
               groups: np.ndarray | None = None) -> tuple[float, float]:
    """(penalty, its inner-CV score) over `grid`: held-out accuracy for classification (ties to the
    weaker penalty: scored by log-loss, the near-uniform prediction of the strongest penalty won at
    25 labels, where every weaker one classified better), minus the mean squared error of the
    standardised targets for regression (ties to the stronger penalty). The folds are drawn
    `repeats` times (a 25-label sample has ~3 rows per fold: one split is a coin toss), grouped by
    `groups` when given. The score lets a caller compare feature sets (a study's read-outs) with
    the same folds, without a second, nested CV. A single penalty is returned unscored (nan)."""
    grid = sorted(float(g) for g in grid)
    if len(grid) == 1:
        return grid[0], float("nan")
    a = np.asarray(f, dtype=np.float64)
    y = np.asarray(y)
    correct, loss, rows = np.zeros(len(grid)), np.zeros(len(grid)), 0
    splits = [(fold != i, fold == i) for r in range(repeats) for fold in [inner_folds(y, task, seed=r, groups=groups)]
              for i in np.unique(fold)]
    for tr, va in splits:
        if task == "classification" and len(np.unique(y[tr])) < len(np.unique(y)):
            continue
        rows += int(va.sum())
        a_tr, mu, sd = _standardise(a[tr])
        z, v = _basis(a_tr)
        z_va = ((a[va] - mu) / sd) @ v
        start = None
        for j in reversed(range(len(grid))):  # strongest penalty first, each warm-starting the next
            w, bias = _fit_z(z, y[tr], task, n_out, grid[j], start)
            out = z_va @ w.T + bias
            if task == "classification":
                start = np.concatenate([w, np.reshape(bias, (-1, 1))], axis=1)
                correct[j] += float((out.argmax(1) == y[va]).sum())
            else:
                scale = y[tr].reshape(int(tr.sum()), -1).std(0) + 1e-12
                err = (out.reshape(int(va.sum()), -1) - y[va].reshape(int(va.sum()), -1)) / scale
                loss[j] += float((err**2).sum())
    if task == "classification":  # ties in accuracy: the weaker penalty (the strongest ones only shrink)
        best = min(range(len(grid)), key=lambda j: (-correct[j], grid[j]))
        return grid[best], correct[best] / max(rows, 1)
    best = min(range(len(grid)), key=lambda j: (round(loss[j], 9), -grid[j]))
    return grid[best], -loss[best] / max(rows * int(np.prod(y.shape[1:])), 1)


def as_grid(l2: Penalty) -> tuple[float, ...]:
    return (float(l2),) if isinstance(l2, (int, float)) else tuple(float(v) for v in l2)


def fit_linear(f: np.ndarray, y: np.ndarray, task: str, n_out: int, l2: Penalty,
               groups: np.ndarray | None = None) -> nn.Sequential:
    """f (n, d); y (n,) class indices, or (n,) / (n, k) values -> BatchNorm + Linear in eval mode.
    `l2`: one penalty, or a grid chosen among by `choose_l2` on these rows, folds grouped by
    `groups` when given (recorded on the module as `.l2`)."""
    chosen = choose_l2(f, y, task, n_out, as_grid(l2), groups=groups)
    a, mu, sd = _standardise(np.asarray(f, dtype=np.float64))
    weight, bias = _solve(a, np.asarray(y, dtype=np.float64) if task == "regression" else np.asarray(y), task,
                          n_out, chosen)
    model = linear_head(a.shape[1], weight.shape[0]).eval()
    bn, head = model[0], model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(mu))
        bn.running_var.copy_(torch.from_numpy(sd**2))
        head.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        head.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
    model.l2 = chosen
    return model


def linear_head(n_features: int, n_out: int) -> nn.Sequential:
    """The fitted model's layout, unfitted: BatchNorm (no affine; eps 0, so its running statistics
    standardise exactly as the fit did) + Linear. One definition, so a saved head loads back."""
    return nn.Sequential(nn.BatchNorm1d(n_features, affine=False, eps=0.0), nn.Linear(n_features, n_out))


def fit_predict(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, task: str, n_classes: int,
                l2: Penalty, groups: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities (classification) or values of the test rows."""
    model = fit_linear(f_train, y_train, task, n_classes, l2, groups)
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(f_test), dtype=torch.float32))
    if task == "regression":
        return out.numpy().reshape(len(f_test), -1).squeeze(-1) if np.ndim(y_train) == 1 else out.numpy()
    return torch.softmax(out.double(), 1).numpy()
