"""DP-SGD at a site: correct per-sample gradients, cumulative epsilon across rounds, budget stop."""

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.grad_sample import GradSampleModule

from mrsfm_model.mae import SpectroMAE, mae_config, mae_loss
from mrsfm_model.privacy import DPConfig, PrivateSite, register_grad_samplers
from mrsfm_model.train import OptimConfig, Trainer


def _trainer(seed=0):
    torch.manual_seed(seed)
    return Trainer(SpectroMAE(mae_config("micro", img_size=(64, 64))), mae_loss, OptimConfig(lr=1e-3), 100, 8,
                   progress=False)


def test_per_sample_gradients_add_up_to_the_batch_gradient():
    """The token rules and timm LayerNorm rule are right if per-sample grads average to the grad."""
    register_grad_samplers()
    torch.manual_seed(0)
    model = GradSampleModule(SpectroMAE(mae_config("micro", img_size=(64, 64))), loss_reduction="mean")
    x = torch.randn(5, 3, 64, 64)
    loss, _, _ = model(x)
    loss.backward()
    names = {n for n, _ in model.named_parameters()}
    assert any("cls_token" in n for n in names) and any("mask_token" in n for n in names)
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, name
        assert p.grad_sample.shape == (5, *p.shape), name
        assert torch.allclose(p.grad_sample.mean(0), p.grad, atol=1e-6, rtol=1e-4), name


def test_epsilon_is_cumulative_across_rounds_and_matches_opacus():
    cfg = DPConfig(enabled=True, noise_multiplier=1.1, batch_size=4, delta=1e-5)
    x = torch.randn(20, 3, 64, 64)
    first = PrivateSite(_trainer(), x, cfg)
    r1 = first.private_steps(3)
    state = first.state()  # what the client persists between rounds (fresh process each round)
    second = PrivateSite(_trainer(1), x, cfg, state=state)
    r2 = second.private_steps(4)
    independent = PRVAccountant()
    for _ in range(7):
        independent.step(noise_multiplier=1.1, sample_rate=4 / 20)
    assert r2["epsilon"] == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)
    per_round = PRVAccountant()
    for _ in range(4):
        per_round.step(noise_multiplier=1.1, sample_rate=4 / 20)
    assert r2["epsilon"] > per_round.get_epsilon(1e-5) and r2["epsilon"] > r1["epsilon"]


def test_budget_stops_private_steps():
    cfg = DPConfig(enabled=True, noise_multiplier=1.0, batch_size=4, epsilon_budget=3.0)
    site = PrivateSite(_trainer(), torch.randn(20, 3, 64, 64), cfg)
    out = site.private_steps(50)
    assert 0 < out["private_steps"] < 50 and out["budget_spent"] and out["epsilon"] <= 3.0
    assert site.private_steps(5)["private_steps"] == 0


def test_target_epsilon_picks_sigma_for_the_planned_steps():
    cfg = DPConfig(enabled=True, noise_multiplier=None, target_epsilon=3.0, planned_steps=10, batch_size=4)
    site = PrivateSite(_trainer(), torch.randn(20, 3, 64, 64), cfg)
    site.private_steps(10)
    assert site.epsilon() == pytest.approx(3.0, rel=0.05)


def test_reference_figures_of_the_design_notes():
    """2,000 spectra, batch 64, one epoch per round, sigma 1.0, delta 1e-5: 1.5 after 1 round, 8.4 after 50
    with the PRV accountant (the default); the looser RDP bound says 2.0 and 9.1."""
    acc = PRVAccountant()
    q, steps = 64 / 2000, 2000 // 64
    acc.history = [(1.0, q, steps)]
    assert acc.get_epsilon(1e-5) == pytest.approx(1.5, abs=0.15)
    acc.history = [(1.0, q, steps * 50)]
    assert acc.get_epsilon(1e-5) == pytest.approx(8.4, abs=0.5)


def test_public_steps_do_not_touch_the_accountant():
    site = PrivateSite(_trainer(), torch.randn(12, 3, 64, 64), DPConfig(enabled=True, batch_size=4))
    site.private_steps(2)
    eps = site.epsilon()
    with site.public() as tr:
        tr.train_step(torch.randn(6, 3, 64, 64))
    assert site.epsilon() == eps and site.state()["history"][0][2] == 2


def test_rdp_accountant_is_selectable():
    cfg = DPConfig(enabled=True, noise_multiplier=1.0, batch_size=4, accountant="rdp")
    site = PrivateSite(_trainer(), torch.randn(20, 3, 64, 64), cfg)
    site.private_steps(2)
    ref = RDPAccountant()
    ref.history = [(1.0, 0.2, 2)]
    assert site.epsilon() == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
