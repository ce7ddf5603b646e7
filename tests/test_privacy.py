"""DP-SGD at a site: correct per-sample gradients, cumulative epsilon across rounds, budget stop."""

import json
import re
import shutil

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.grad_sample import GradSampleModule

from mrsfm_model.data.latents import NAMES as LATENT_NAMES
from mrsfm_model.data.stream import Batch
from mrsfm_model.model.mae import SpectroMAE, mae_config, mae_loss
from mrsfm_model.training.privacy import DPConfig, PrivateSite, register_grad_samplers
from mrsfm_model.training.trainer import OptimConfig, Trainer


def _prv_epsilon(steps: int, sigma: float, rate: float, delta: float = 1e-5) -> float:
    """Epsilon of an independent Opacus PRV accountant after `steps` steps."""
    acc = PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=rate)
    return acc.get_epsilon(delta)


def _trainer(seed=0):
    torch.manual_seed(seed)
    return Trainer(SpectroMAE(mae_config("micro", img_size=(64, 64))), mae_loss, OptimConfig.from_config(lr=1e-3), 100, 8,
                   progress=False)


def test_per_sample_gradients_add_up_to_the_batch_gradient():
    """The token rules and timm LayerNorm rule are right if per-sample grads average to the grad."""
    register_grad_samplers()
    torch.manual_seed(0)
    model = GradSampleModule(SpectroMAE(mae_config("micro", img_size=(64, 64))), loss_reduction="mean")
    x = torch.randn(5, 3, 64, 64)
    loss = model(x).loss
    loss.backward()
    names = {n for n, _ in model.named_parameters()}
    assert any("cls_token" in n for n in names) and any("mask_token" in n for n in names)
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, name
        assert p.grad_sample.shape == (5, *p.shape), name
        assert torch.allclose(p.grad_sample.mean(0), p.grad, atol=1e-6, rtol=1e-4), name


def test_the_latent_loss_comes_back_through_opacus_wrapper():
    """mae_loss takes the latent loss from the forward's outputs: a wrapped MAE reports the same
    loss and latent loss as the bare one, and its per-sample gradients still reach the head."""
    register_grad_samplers()
    torch.manual_seed(0)
    mae = SpectroMAE(mae_config("micro", img_size=(64, 64), latent_weight=1.0, latent_fraction=1.0))
    batch = Batch(x=torch.randn(4, 3, 64, 64), vendor=torch.zeros(4, dtype=torch.long),
                  invivo=torch.zeros(4, dtype=torch.bool), latents=torch.randn(4, len(LATENT_NAMES)))
    torch.manual_seed(1)  # the same masks for both
    bare_loss, bare = mae_loss(mae, batch)
    wrapped = GradSampleModule(mae, loss_reduction="mean")
    torch.manual_seed(1)
    loss, metrics = mae_loss(wrapped, batch)
    assert torch.isfinite(bare["latent_loss"]) and bare["latent_loss"] > 0
    assert torch.equal(metrics["latent_loss"], bare["latent_loss"]) and torch.equal(loss, bare_loss)
    loss.backward()
    for p in (mae.latent_head.weight, mae.decoder_pred.weight):
        assert p.grad_sample.shape == (4, *p.shape)


def test_epsilon_is_cumulative_across_rounds_and_matches_opacus():
    cfg = DPConfig.from_config(enabled=True, noise_multiplier=1.1, batch_size=4, delta=1e-5)
    x = torch.randn(20, 3, 64, 64)
    first = PrivateSite(_trainer(), x, cfg)
    r1 = first.private_steps(3)
    state = first.state()  # what the client persists between rounds (fresh process each round)
    second = PrivateSite(_trainer(1), x, cfg, state=state)
    r2 = second.private_steps(4)
    assert r2["epsilon"] == pytest.approx(_prv_epsilon(7, 1.1, 4 / 20), rel=1e-9)
    assert r2["epsilon"] > _prv_epsilon(4, 1.1, 4 / 20) and r2["epsilon"] > r1["epsilon"]


def test_budget_stops_private_steps():
    cfg = DPConfig.from_config(enabled=True, noise_multiplier=1.0, batch_size=4, epsilon_budget=3.0)
    site = PrivateSite(_trainer(), torch.randn(20, 3, 64, 64), cfg)
    out = site.private_steps(50)
    assert 0 < out["private_steps"] < 50 and out["budget_spent"] and out["epsilon"] <= 3.0
    assert site.private_steps(5)["private_steps"] == 0
    # exactly the steps a step-by-step check allows: one more would exceed the budget
    assert _prv_epsilon(out["private_steps"], 1.0, 4 / 20) <= 3.0 < _prv_epsilon(out["private_steps"] + 1, 1.0, 4 / 20)


def test_target_epsilon_picks_sigma_for_the_planned_steps():
    cfg = DPConfig.from_config(enabled=True, noise_multiplier=None, target_epsilon=3.0, planned_steps=10, batch_size=4)
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


def test_public_steps_do_not_touch_the_accountant_and_the_trainer_is_never_rewired():
    tr = _trainer()
    model, optimizer, loss_fn, clip = tr.model, tr.optimizer, tr.loss_fn, tr.cfg.grad_clip
    site = PrivateSite(tr, torch.randn(12, 3, 64, 64), DPConfig.from_config(enabled=True, batch_size=4))
    site.private_steps(2)
    eps = site.epsilon()
    tr.train_step(torch.randn(6, 3, 64, 64))  # the Trainer's own step: no hooks, no noise, no accounting
    assert site.epsilon() == eps and site.state()["history"][0][2] == 2 and tr.step == 3
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    assert (tr.model, tr.optimizer, tr.loss_fn, tr.cfg.grad_clip) == (model, optimizer, loss_fn, clip)


def test_a_dp_round_reports_the_loss_of_its_public_steps_only():
    site = PrivateSite(_trainer(), torch.randn(12, 3, 64, 64), DPConfig.from_config(enabled=True, batch_size=4))
    public = iter([torch.randn(4, 3, 64, 64) for _ in range(8)])
    everything_private = site.run_round(public, steps=3, private_steps=3)
    assert everything_private["loss"] is None and everything_private["private_steps"] == 3
    mixed = site.run_round(public, steps=4, private_steps=2)
    assert isinstance(mixed["loss"], float) and mixed["public_steps"] == 2


def test_rdp_accountant_is_selectable():
    cfg = DPConfig.from_config(enabled=True, noise_multiplier=1.0, batch_size=4, accountant="rdp")
    site = PrivateSite(_trainer(), torch.randn(20, 3, 64, 64), cfg)
    site.private_steps(2)
    ref = RDPAccountant()
    ref.history = [(1.0, 0.2, 2)]
    assert site.epsilon() == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)


# -- the federated client's round with DP on (client.app.local_round, what the ClientApp runs) ----------
def _round(tmp_path, rnd, extra="", run_key="run", dp=True, data="private"):
    from client.app import local_round

    conf = {"strategy": "fedavg", "server-round": rnd, "local-steps": 4, "total-steps": 8, "wire-dtype": "bf16",
            "run-key": run_key, "overrides": "model=micro data.batch_size=4 data.invivo_fraction=0.5 "
            "data.sim_profiles=[press_ge]"}
    node = {"site": "einstein", "data-dir": str(tmp_path / data), "state-dir": str(tmp_path / "state"),
            "device": "cpu",  # privacy is the site's own (its site config's overrides), never the coordinator's
            "overrides": (f"privacy.enabled={str(dp).lower()} privacy.noise_multiplier=1.1 privacy.batch_size=2 "
                          + extra)}
    return local_round(conf, node, lambda template: {k: v.clone() for k, v in template.items()})


@pytest.fixture
def private_folder(tmp_path):
    from mrsfm_model.data.simulate import write_simulated

    write_simulated("press_ge", 8, tmp_path / "private", seed=3)
    return tmp_path


@pytest.mark.slow  # whole client rounds (config, data, model, trainer), like the two below
@pytest.mark.parametrize("clipping", ["flat", "ghost"])
def test_client_reports_cumulative_epsilon_equal_to_an_independent_accountant(private_folder, clipping):
    _, m1 = _round(private_folder, 1, f"privacy.clipping={clipping}")
    state, m2 = _round(private_folder, 2, f"privacy.clipping={clipping}")  # the warm session, as a site worker keeps it
    assert m1["private-steps"] == m2["private-steps"] == 2  # half of 4 steps (invivo_fraction 0.5)
    assert m2["epsilon"] == pytest.approx(_prv_epsilon(4, 1.1, 2 / 8), rel=1e-9) and m2["epsilon"] > m1["epsilon"]
    assert m2["budget-spent"] == 0.0 and all(torch.isfinite(v).all() for v in state.values())
    assert not any(k.startswith("_module") for k in state)  # the plain model's weights, not Opacus' wrapper
    (ledger,) = (private_folder / "state" / "privacy-ledger").glob("*.json")
    saved = json.loads(ledger.read_text())
    assert saved["history"] == [[1.1, 0.25, 4]] and saved["runs"] == ["run"] and saved["unprotected_rounds"] == 0


@pytest.mark.slow
def test_epsilon_continues_across_runs_on_the_same_spectra_and_counts_rounds_without_dp(private_folder):
    _, first = _round(private_folder, 1, run_key="runA")
    _, again = _round(private_folder, 1, run_key="runB")  # a new run (new run-dir, new key) on the same data
    assert first["epsilon"] == pytest.approx(_prv_epsilon(2, 1.1, 2 / 8), rel=1e-9)
    assert again["epsilon"] == pytest.approx(_prv_epsilon(4, 1.1, 2 / 8), rel=1e-9)  # run B starts where A ended
    _, plain = _round(private_folder, 2, run_key="runB", dp=False)  # DP switched off for a round
    assert plain["unprotected-rounds"] == 1.0 and "epsilon" not in plain
    _, later = _round(private_folder, 3, run_key="runB")
    assert later["unprotected-rounds"] == 1.0  # still on record once DP is back on
    shutil.copytree(private_folder / "private", private_folder / "other")
    (private_folder / "other" / "extra.txt").write_text("a different data set")
    _, other = _round(private_folder, 1, run_key="runC", data="other")
    assert other["epsilon"] == pytest.approx(first["epsilon"], rel=1e-9) and other["unprotected-rounds"] == 0.0


@pytest.mark.slow
def test_client_stops_private_steps_when_the_budget_is_spent_and_keeps_training(private_folder, capfd):
    one = PRVAccountant()
    one.step(noise_multiplier=1.1, sample_rate=2 / 8)
    budget = one.get_epsilon(1e-5) * 1.01  # room for exactly one private step
    _, m1 = _round(private_folder, 1, f"privacy.epsilon_budget={budget}")
    _, m2 = _round(private_folder, 2, f"privacy.epsilon_budget={budget}")
    assert (m1["private-steps"], m1["budget-spent"]) == (1, 1.0) and m1["epsilon"] <= budget
    assert m2["private-steps"] == 0 and m2["epsilon"] == m1["epsilon"] and m2["num-examples"] == 16
    assert "warning: [mrsfm] einstein: privacy budget spent" in capfd.readouterr().err  # the site log, at WARNING


def test_client_with_dp_but_no_private_data_says_why(tmp_path):
    from client.app import local_round

    conf = {"strategy": "fedavg", "server-round": 1, "local-steps": 2, "total-steps": 2, "wire-dtype": "bf16",
            "run-key": "run", "overrides": "model=micro data.batch_size=4"}
    with pytest.raises(ValueError, match="needs private in vivo spectra"):
        local_round(conf, {"site": "x", "state-dir": str(tmp_path), "device": "cpu",
                           "overrides": "privacy.enabled=true"}, lambda t: t)


@pytest.mark.parametrize("word", ["privacy.delta=0.5", "+privacy.epsilon_budget=100", "privacy=default",
                                  "~privacy.enabled", "data.invivo_dir=/etc"])
def test_a_site_refuses_the_coordinators_privacy_and_data_path_overrides(word, tmp_path, capsys):
    from client.app import local_round

    conf = {"strategy": "fedavg", "server-round": 1, "local-steps": 1, "total-steps": 1, "wire-dtype": "bf16",
            "run-key": "run", "overrides": f"model=micro {word}"}
    key = word.split("=")[0].lstrip("+~")
    with pytest.raises(ValueError, match=rf"x: refused the coordinator's override of {re.escape(key)} "):
        local_round(conf, {"site": "x", "state-dir": str(tmp_path / "state"), "device": "cpu"}, lambda t: t)
    assert f"refused the coordinator's override of {key}" in capsys.readouterr().err  # in the site's log
    assert not (tmp_path / "state").exists()


def test_an_empty_poisson_batch_is_a_counted_noise_only_step():
    site = PrivateSite(_trainer(), torch.randn(8, 3, 64, 64), DPConfig.from_config(enabled=True, batch_size=2))
    before = [p.detach().clone() for p in site.trainer.model.parameters()]
    site.loader = [(torch.empty(0, 3, 64, 64),)]  # what Poisson sampling yields when it picks nobody
    assert site.private_steps(1)["private_steps"] == 1 and site.state()["history"] == [[1.0, 0.25, 1]]
    moved = [not torch.equal(a, b) for a, b in zip(before, site.trainer.model.parameters())]
    assert any(moved) and all(torch.isfinite(p).all() for p in site.trainer.model.parameters())


def test_noise_and_sampling_cannot_be_regenerated_from_the_config_or_the_seeds():
    """Two sites with the same config, data, model, seeds and global RNG state: their private steps
    must differ (the noise and the Poisson draws come from OS entropy, not from anything the
    coordinator knows or a checkpoint stores)."""
    after = []
    for _ in range(2):
        torch.manual_seed(0)
        tr = _trainer(0)
        site = PrivateSite(tr, torch.arange(16 * 3 * 64 * 64, dtype=torch.float32).reshape(16, 3, 64, 64) / 1e5,
                           DPConfig.from_config(enabled=True, noise_multiplier=1.0, batch_size=8))
        torch.manual_seed(1)  # the same masks in both
        site.private_steps(1)
        after.append(torch.cat([p.detach().flatten() for p in tr.model.parameters()]))
    assert not torch.equal(after[0], after[1])


def test_ghost_clipping_gives_the_same_clipped_gradient_as_per_sample_gradients():
    """Noise off and a clipping norm every sample exceeds: both modes must apply the same
    per-sample clipping (which differs from clipping the batch gradient)."""
    x = torch.randn(6, 3, 64, 64)
    grads = {}
    for mode in ("flat", "ghost"):
        tr = _trainer(0)
        site = PrivateSite(tr, torch.randn(12, 3, 64, 64), DPConfig.from_config(
            enabled=True, noise_multiplier=0.0, batch_size=6, max_grad_norm=0.05, clipping=mode))
        torch.manual_seed(1)  # the same masks
        site.private_step(x)  # a DP-SGD step on a fixed batch (no epsilon: sigma 0 makes it infinite)
        # (the latent head sits the private step out: tested below)
        grads[mode] = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])
    plain = _trainer(0)
    torch.manual_seed(1)
    mae_loss(plain.model, x)[0].backward()
    batch_grad = torch.cat([p.grad.flatten() for p in plain.model.parameters()])
    assert torch.allclose(grads["ghost"], grads["flat"], atol=1e-6, rtol=1e-4)
    assert grads["flat"].norm() < 0.05 + 1e-6 < batch_grad.norm()  # clipping was active


@pytest.mark.slow  # whole client rounds
def test_a_failed_private_round_leaves_no_opacus_hooks_on_the_warm_model(private_folder, monkeypatch):
    from mrsfm_model.training.privacy import PrivateSite

    real = PrivateSite.run_round
    calls = []

    def fail_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PrivateSite, "run_round", fail_once)
    with pytest.raises(RuntimeError, match="simulated"):
        _round(private_folder, 1)
    _, metrics = _round(private_folder, 1)  # the same warm model: would be "hooks twice" without the cleanup
    assert metrics["private-steps"] == 2 and len(calls) == 2


@pytest.mark.parametrize("clipping", ["ghost", "flat"])
def test_private_steps_leave_the_latent_head_alone_and_public_steps_train_it(clipping):
    """The head regresses simulator truth that private spectra lack: DP noise would be its only
    gradient (and AdamW makes noise a full-size step), so it sits out the private steps."""
    torch.manual_seed(0)
    tr = Trainer(SpectroMAE(mae_config("micro", img_size=(64, 64), latent_weight=1.0)), mae_loss,
                 OptimConfig.from_config(lr=1e-3), 100, 8, progress=False)
    head = tr.model.latent_head
    assert list(head.parameters()) == tr.model.public_only_parameters()
    site = PrivateSite(tr, torch.randn(12, 3, 64, 64),
                       DPConfig.from_config(enabled=True, noise_multiplier=1.0, batch_size=4, clipping=clipping))
    public = Batch(x=torch.randn(4, 3, 64, 64), vendor=torch.zeros(4, dtype=torch.long),
                   invivo=torch.zeros(4, dtype=torch.bool), latents=torch.randn(4, len(LATENT_NAMES)))
    tr.train_step(public)  # a public step: the head moves, and leaves a gradient behind
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    state = {n: {k: v.clone() for k, v in tr.optimizer.state[p].items()} for n, p in head.named_parameters()}
    assert site.private_steps(3)["private_steps"] == 3
    moved = {n for n, p in tr.model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and not any(n.startswith("latent_head.") for n in moved)  # the encoder did move
    for n, p in head.named_parameters():  # nor did its AdamW moments
        assert all(torch.equal(state[n][k], v) for k, v in tr.optimizer.state[p].items())
    assert all(p.requires_grad for p in tr.model.parameters())
    tr.train_step(public)
    assert not torch.equal(before["latent_head.weight"], head.weight)  # public steps still train it
