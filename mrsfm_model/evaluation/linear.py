"""Regularised linear models on standardised features: the non-deep baselines and the linear probe.

One estimator for both, so "pretrained features vs pixels" compares representations, not fitting
procedures: multinomial logistic regression (L-BFGS) or ridge regression (dual form, as the
labelled sets are far smaller than the feature count), L2 penalty `l2` on the mean loss, features
standardised on the training set. The fit comes back as a torch module, BatchNorm (no affine, its
running statistics = the training mean and variance) followed by a Linear layer, so it can be
saved, and can start a full fine-tune as the head of a ViT (LP-FT).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def fit_linear(f: np.ndarray, y: np.ndarray, task: str, n_out: int, l2: float) -> nn.Sequential:
    """f (n, d); y (n,) class indices, or (n,) / (n, k) values -> BatchNorm + Linear in eval mode."""
    a = np.asarray(f, dtype=np.float64)
    mu, sd = a.mean(0), a.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    a = (a - mu) / sd
    if task == "regression":
        yv = np.asarray(y, dtype=np.float64).reshape(len(a), -1)
        y_mu = yv.mean(0)
        gram = a @ a.T + len(a) * l2 * np.eye(len(a))
        weight, bias = (a.T @ np.linalg.solve(gram, yv - y_mu)).T, y_mu
    else:
        xa, ya = torch.from_numpy(a), torch.from_numpy(np.asarray(y, dtype=np.int64))
        lin = nn.Linear(a.shape[1], n_out, dtype=torch.float64)
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(lin(xa), ya) + l2 * lin.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        weight, bias = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    bn = nn.BatchNorm1d(a.shape[1], affine=False, eps=0.0)
    bn.running_mean.copy_(torch.from_numpy(mu))
    bn.running_var.copy_(torch.from_numpy(sd**2))
    head = nn.Linear(a.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        head.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
    return nn.Sequential(bn, head).eval()


def fit_predict(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, task: str, n_classes: int,
                l2: float) -> np.ndarray:
    """Class probabilities (classification) or values of the test rows."""
    model = fit_linear(f_train, y_train, task, n_classes, l2)
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(f_test), dtype=torch.float32))
    if task == "regression":
        return out.numpy().reshape(len(f_test), -1).squeeze(-1) if np.ndim(y_train) == 1 else out.numpy()
    return torch.softmax(out.double(), 1).numpy()
