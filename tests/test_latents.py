"""The simulator-truth pretext (model.latent_weight): targets, stream rows, the MAE's second loss (CPU, seconds)."""

import math

import pytest
import torch

from mrsfm_model.config import load_config
from mrsfm_model.data.latents import NAMES, decode, latent_loss, latent_targets
from mrsfm_model.data.simulate import Simulator
from mrsfm_model.data.stream import InputBuilder, InVivoSet, MixedStream
from mrsfm_model.errors import MRSDataError
from mrsfm_model.model.export import encoder_state, export_encoder, load_encoder
from mrsfm_model.model.mae import SpectroMAE, mae_config, mae_loss
from mrsfm_model.model.quantifier import calibrate, has_quantifier, load_quantifier
from mrsfm_model.training.privacy import DPConfig, PrivateSite
from mrsfm_model.training.trainer import OptimConfig, Trainer


@pytest.fixture(scope="module")
def sim():
    return Simulator("megapress_ge", device="cpu")


def test_targets_are_log_ratios_to_tcr_and_nan_where_the_basis_lacks_a_metabolite(sim):
    out = sim.simulate(6, seed=3)
    y = latent_targets(out.truth, sim.mm_names)
    assert y.shape == (6, len(NAMES)) and torch.isfinite(y).all()
    t = out.truth
    naa = torch.log((t["NAA"] + t["NAAG"]) / (t["Cr"] + t["PCr"]))
    assert torch.allclose(y[:, NAMES.index("tNAA")], naa, atol=1e-5)
    assert torch.allclose(y[:, NAMES.index("phase0_cos")], torch.cos(torch.deg2rad(t["phase0"])) / 0.7, atol=1e-5)
    no_gaba = {k: v for k, v in t.items() if k != "GABA"}
    z = latent_targets(no_gaba, sim.mm_names)
    assert torch.isnan(z[:, NAMES.index("GABA")]).all()
    assert torch.equal(torch.isfinite(z).sum(1), torch.full((6,), len(NAMES) - 1))


def test_decode_turns_targets_back_into_the_simulators_truth(sim):
    t = sim.simulate(6, seed=4).truth
    d = decode(latent_targets(t, sim.mm_names))
    tcr = t["Cr"] + t["PCr"]
    assert torch.allclose(d["GABA/tCr"], t["GABA"] / tcr, rtol=1e-4)
    assert torch.allclose(d["tNAA/tCr"], (t["NAA"] + t["NAAG"]) / tcr, rtol=1e-4)
    for key in ("lorentzian_hz", "gaussian_hz", "shift_hz", "phase1", "baseline", "water"):
        assert torch.allclose(d[key], t[key].float(), atol=1e-4), key
    assert torch.allclose((d["phase0"] - t["phase0"] + 180) % 360 - 180, torch.zeros(6), atol=1e-3)
    assert torch.allclose(d["snr"], t["snr"].float(), rtol=1e-4)


def test_loss_skips_unknown_targets():
    pred = torch.tensor([[1.0, 2.0], [5.0, 5.0]])
    target = torch.tensor([[0.0, math.nan], [math.nan, math.nan]])
    assert latent_loss(pred, target).item() == pytest.approx(1.0)
    assert latent_loss(pred, target, per_sample=True).tolist() == [1.0, 0.0]


def test_stream_gives_simulated_rows_their_truth_and_in_vivo_rows_nan(sim):
    cfg = load_config([])
    builder = InputBuilder.from_data_config(cfg.data)
    invivo = InVivoSet(sim.simulate(4, seed=9).to_spectra(), builder)
    stream = MixedStream([sim], builder.transform, cfg.data.channels, 8, invivo, invivo_fraction=0.25, seed=1)
    b = stream.batch(0)
    assert b.latents.shape == (8, len(NAMES))
    assert torch.isnan(b.latents[b.invivo]).all() and b.invivo.sum() == 2
    assert torch.isfinite(b.latents[~b.invivo]).all()


def _mae(weight: float) -> SpectroMAE:
    torch.manual_seed(0)
    return SpectroMAE(mae_config("micro", latent_weight=weight))


def test_latent_head_adds_a_weighted_second_loss_that_trains_and_stays_out_of_the_vit_state():
    model, plain = _mae(2.0), _mae(0.0)
    assert plain.latent_head is None and model.latent_head is not None
    x, y = torch.randn(4, 3, 64, 32), torch.randn(4, len(NAMES))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    base, _, _, none = model(x, generator=g())
    both, _, _, latent = model(x, generator=g(), latents=y)
    rows = model.latent_rows(y)  # the configured share of the rows, with the configured weights
    assert rows.numel() == max(1, round(model.cfg.latent_fraction * 4))
    aux = latent_loss(model.latent_head(model.encode(x[rows])[:, 1:].flatten(1)), y[rows], weights=model.latent_weights)
    assert torch.allclose(both, base + 2.0 * aux, atol=1e-5)
    assert none is None and not latent.requires_grad and torch.allclose(latent, aux, atol=1e-6)  # reported alone
    unknown, _, _, left_out = model(x, generator=g(), latents=torch.full_like(y, math.nan))
    assert torch.allclose(unknown, base) and left_out is None  # in vivo rows add nothing
    assert "latent_head.weight" not in encoder_state(model)
    batch = type("B", (), {"x": x, "target": None, "latents": y})()
    tr = Trainer(model, mae_loss, OptimConfig.from_config(lr=3e-3, warmup_steps=2), 60, 4, progress=False)
    first = tr.train_step(batch)["latent_loss"].item()
    for _ in range(58):
        last = tr.train_step(batch)["latent_loss"].item()
    assert last < 0.5 * first


def test_private_steps_run_with_a_latent_head():
    """DP-SGD steps on private images (no truth) leave the head out and still clip and noise."""
    tr = Trainer(_mae(1.0), mae_loss, OptimConfig.from_config(lr=1e-3), 10, 4, progress=False)
    site = PrivateSite(tr, torch.randn(12, 3, 64, 32), DPConfig.from_config(enabled=True, batch_size=4))
    out = site.private_steps(2)
    assert out["private_steps"] == 2 and out["epsilon"] > 0


def test_a_latent_head_run_continues_from_a_plain_mae_with_a_fresh_head(tmp_path):
    from mrsfm_model.model.export import init_mae, save_mae

    plain, headed = _mae(0.0), _mae(1.0)
    path = save_mae(plain, tmp_path / "plain.mae.safetensors")
    fresh_head = headed.latent_head.weight.detach().clone()
    assert init_mae(headed, path) == path
    assert torch.equal(headed.state_dict()["blocks.0.attn.qkv.weight"], plain.state_dict()["blocks.0.attn.qkv.weight"])
    assert torch.equal(headed.latent_head.weight, fresh_head)
    back = _mae(0.0)
    assert init_mae(back, save_mae(headed, tmp_path / "headed.mae.safetensors"))  # the head is left behind


def test_the_exported_encoder_carries_its_head_as_the_models_own_quantifier(tmp_path):
    model, x = _mae(1.0).eval(), torch.randn(3, 3, 64, 32)
    path = export_encoder(model, tmp_path / "e.safetensors")
    assert has_quantifier(path)
    quantifier = load_quantifier(path)
    with torch.no_grad():
        assert torch.allclose(quantifier(x), model.latent_head(model.encode(x)[:, 1:].flatten(1)), atol=1e-5)
    est = quantifier.estimate(x)
    assert {"GABA/tCr", "tNAA/tCr", "MM/tCr", "lorentzian_hz", "phase0", "snr"} <= set(est)
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in est.values())
    assert load_encoder(path, num_classes=3, global_pool="avg")(x).shape == (3, 3)  # fine-tuning leaves the head out
    plain = export_encoder(_mae(0.0), tmp_path / "plain.safetensors")
    assert not has_quantifier(plain)
    with pytest.raises(MRSDataError, match=r"plain\.safetensors.*no latent head"):
        load_quantifier(plain)


def test_calibration_is_the_least_squares_line():
    est = torch.tensor([1.0, 2.0, 3.0, 4.0]).numpy()
    assert calibrate(est, 2 * est + 1) == pytest.approx((2.0, 1.0))


def test_gaba_is_not_asked_of_unedited_spectra_and_balanced_weights_scale_the_ratios(sim):
    from mrsfm_model.data.latents import RATIO_SCALES, UNSEEN, loss_weights

    out = sim.simulate(4, seed=5)
    y = latent_targets(out.truth, sim.mm_names, edited=False)
    assert torch.isnan(y[:, NAMES.index("GABA")]).all()
    assert torch.isfinite(y[:, NAMES.index("tNAA")]).all()
    w = loss_weights(True)
    assert w[NAMES.index("GABA")] == pytest.approx(RATIO_SCALES["GABA"] ** -2)
    assert all(w[NAMES.index(n)] == 0 for n in UNSEEN)
    assert torch.equal(loss_weights(False), torch.ones(len(NAMES)))
    # an error of one spread on GABA alone weighs what an error of 1 on a nuisance target weighs
    target = torch.zeros(1, len(NAMES))
    gaba, shift = target.clone(), target.clone()
    gaba[0, NAMES.index("GABA")] = RATIO_SCALES["GABA"]
    shift[0, NAMES.index("shift")] = 1.0
    assert latent_loss(gaba, target, weights=w).item() == pytest.approx(latent_loss(shift, target, weights=w).item())


def test_the_stream_leaves_gaba_out_of_its_press_rows():
    from mrsfm_model.config import load_config
    from mrsfm_model.data.stream import build_stream

    cfg = load_config(["data.sim_profiles=[press_ge,megapress_ge]", "data.batch_size=8", "data.prefetch=0"])
    batch = build_stream(cfg.data, seed=0).sim_batch(0)  # 4 PRESS rows, then 4 MEGA-PRESS rows
    gaba = batch.latents[:, NAMES.index("GABA")]
    assert torch.isnan(gaba[:4]).all() and torch.isfinite(gaba[4:]).all()
