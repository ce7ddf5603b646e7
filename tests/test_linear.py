"""The linear read-out of every arm: the row-space solution equals the full one, and the penalty is
chosen by inner CV on the labelled rows alone."""

import numpy as np
import pytest
import torch
from torch import nn

from mrsfm_model.evaluation.linear import choose_l2, fit_linear, fit_predict, inner_folds, penalty_cv

GRID = [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0]


def _data(n=60, d=500, signal=1.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    direction = rng.standard_normal((3, d))
    return rng.standard_normal((n, d)) + signal * direction[y], y


def _primal_logistic(f, y, l2):
    """Reference: the multinomial logistic regression on all d standardised features (L-BFGS)."""
    a = (f - f.mean(0)) / f.std(0)
    lin = nn.Linear(a.shape[1], 3, dtype=torch.float64)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    xa, ya = torch.from_numpy(a), torch.from_numpy(y)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(xa), ya) + l2 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin.weight.detach().numpy()


@pytest.mark.parametrize("l2", [0.01, 1.0])
def test_logistic_in_the_row_span_equals_the_full_problem(l2):
    f, y = _data(d=300, signal=0.2)
    ours = fit_linear(f, y, "classification", 3, l2)[1].weight.detach().double().numpy()
    ref = _primal_logistic(f, y, l2)
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max() + 1e-6


def test_ridge_in_the_row_span_equals_the_closed_form():
    f, _ = _data(n=40, d=120)
    target = f[:, :2] @ np.array([[1.0, 0.5], [-0.3, 2.0]]) + 0.1
    a = (f - f.mean(0)) / f.std(0)
    l2 = 0.5
    w = np.linalg.solve(a.T @ a + len(a) * l2 * np.eye(a.shape[1]), a.T @ (target - target.mean(0)))
    model = fit_linear(f, target, "regression", 2, l2)
    assert np.allclose(model[1].weight.detach().numpy(), w.T, atol=1e-5)


def test_the_chosen_penalty_follows_the_signal_in_the_labelled_rows():
    strong, y = _data(signal=1.0)
    noise = np.random.default_rng(1).standard_normal(strong.shape)
    assert choose_l2(noise, y, "classification", 3, GRID) >= 10.0  # nothing to learn: shrink
    assert choose_l2(strong, y, "classification", 3, GRID) < choose_l2(noise, y, "classification", 3, GRID)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 400))
    signal = choose_l2(x, x[:, 0] + 0.01 * rng.standard_normal(50), "regression", 0, GRID)
    assert signal < choose_l2(x, rng.standard_normal(50), "regression", 0, GRID) and signal <= 1.0
    assert fit_linear(strong, y, "classification", 3, [0.3]).l2 == 0.3  # one value: fixed, no CV


def test_the_penalty_is_chosen_without_the_test_rows():
    """fit_predict sees the test rows only to predict them: any test rows give the same model."""
    f, y = _data()
    tr, te = np.arange(40), np.arange(40, 60)
    a = fit_predict(f[tr], y[tr], f[te], "classification", 3, GRID)
    shuffled = np.random.default_rng(3).permutation(te)
    b = fit_predict(f[tr], y[tr], f[shuffled], "classification", 3, GRID)
    order = np.argsort(shuffled)
    assert np.allclose(a, b[order[np.argsort(np.argsort(te))]])


def test_inner_folds_are_stratified_and_fit_the_smallest_class():
    y = np.array([0] * 9 + [1] * 3 + [2] * 6)
    fold = inner_folds(y, "classification")
    assert len(np.unique(fold)) == 3  # the smallest class has 3 rows
    for k in np.unique(fold):
        assert set(y[fold == k]) == {0, 1, 2}


def test_grouped_inner_folds_keep_each_subject_in_one_fold():
    subjects = np.repeat(np.arange(12), 3)  # 12 subjects, 3 scans each
    y = (subjects % 3).astype(int)
    fold = inner_folds(y, "classification", groups=subjects)
    assert len(np.unique(fold)) == 4  # each class has 4 subjects
    for s in range(12):
        assert len(set(fold[subjects == s])) == 1
    for k in np.unique(fold):
        assert set(y[fold == k]) == {0, 1, 2}


def test_penalty_cv_scores_feature_sets_on_the_same_rows():
    """The score that picks a study's read-out: informative features score above noise."""
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    informative = rng.standard_normal((60, 40)) + 2.0 * np.eye(3)[y] @ rng.standard_normal((3, 40))
    noise = rng.standard_normal((60, 40))
    l2_a, good = penalty_cv(informative, y, "classification", 3, GRID)
    l2_b, bad = penalty_cv(noise, y, "classification", 3, GRID)
    assert l2_a in GRID and l2_b in GRID
    assert good > 0.9 and bad < 0.6
    assert penalty_cv(noise, y, "classification", 3, [1.0])[0] == 1.0
