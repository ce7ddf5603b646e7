"""The pretraining step on a CPU: finite and close in bf16, the cheaper latent pass, the precision
and attention picked per device, and batches made ahead that equal the plain ones."""

import pytest
import torch

from mrsfm_model.config import load_config
from mrsfm_model.data.latents import latent_loss
from mrsfm_model.data.stream import build_stream
from mrsfm_model.model.mae import build_mae, mae_loss
from mrsfm_model.training import trainer as trainer_mod
from mrsfm_model.training.trainer import OptimConfig, Trainer, resolve_precision


def _setup(size: str, batch: int = 8, **model):
    over = [f"model={size}", f"data.batch_size={batch}", "data.prefetch=0"]
    cfg = load_config(over + [f"model.{k}={v}" for k, v in model.items()])
    return cfg, build_stream(cfg.data, seed=3)


@pytest.mark.parametrize("size", ["micro", "tiny"])
def test_one_bf16_step_is_finite_and_close_to_fp32(size):
    """The same model, batch and masks: the loss under bf16 autocast is finite and within a few
    percent of fp32, and so is every weight after one AdamW step."""
    cfg, stream = _setup(size, batch=8)
    batch = stream.batch(0)
    results = {}
    for amp in ("none", "bf16"):
        torch.manual_seed(0)
        model = build_mae(cfg.model, cfg.data)
        trainer = Trainer(model, mae_loss, OptimConfig.from_config(amp=amp, warmup_steps=0), 10, 8, progress=False)
        out = trainer.train_step(batch)
        results[amp] = (float(out["loss"]), float(out["latent_loss"]),
                        torch.cat([p.detach().flatten() for p in model.parameters()]))
    (loss32, lat32, w32), (loss16, lat16, w16) = results["none"], results["bf16"]
    assert torch.isfinite(torch.tensor([loss16, lat16])).all() and torch.isfinite(w16).all()
    assert loss16 == pytest.approx(loss32, rel=0.03)
    assert lat16 == pytest.approx(lat32, rel=0.03)
    assert (w16 - w32).abs().max() < 0.05 * w32.abs().max()


def test_latent_pass_reads_the_configured_share_of_simulated_rows_spread_over_profiles():
    cfg, stream = _setup("micro", batch=24, latent_fraction=0.25)
    model = build_mae(cfg.model, cfg.data)
    sim = stream.sim_batch(0, k=24)  # unshuffled: the profiles in turn, 4 rows each
    rows = model.latent_rows(sim.latents)
    assert rows.numel() == 6 and rows.unique().numel() == 6
    assert len({int(r) // 4 for r in rows}) == 6  # one from every profile's block
    # in vivo rows (no truth) are never picked
    lat = sim.latents.clone()
    lat[::2] = float("nan")
    assert all(int(r) % 2 == 1 for r in model.latent_rows(lat))
    with pytest.raises(ValueError, match="latent_fraction"):
        build_mae(load_config(["model.latent_fraction=0"]).model, cfg.data)


def test_full_latent_share_scores_what_the_full_pass_scored():
    """latent_fraction 1: the head's loss is the old full-batch loss (in vivo rows weigh nothing)."""
    cfg, stream = _setup("micro", batch=8, latent_fraction=1.0, latent_balanced=False)
    torch.manual_seed(0)
    model = build_mae(cfg.model, cfg.data)
    batch = stream.batch(2)
    lat = batch.latents.clone()
    lat[:2] = float("nan")  # two in vivo rows
    with torch.no_grad():
        reported = model(batch.x, latents=lat).latent_loss
        expected = latent_loss(model.latent_head(model.encode(batch.x)[:, 1:].flatten(1)), lat)
    assert float(reported) == pytest.approx(float(expected), rel=1e-5)


def test_precision_and_attention_follow_the_device(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer_mod, "native_bf16", lambda device: False)
    assert resolve_precision("auto", "auto", cpu) == (None, True)  # emulated bf16: fp32, fused kernel
    monkeypatch.setattr(trainer_mod, "native_bf16", lambda device: True)
    monkeypatch.setattr(trainer_mod, "bf16_agrees", lambda device: False)
    with pytest.warns(UserWarning, match="training in fp32"):  # bf16 kernels that disagree: fp32
        assert resolve_precision("auto", "auto", cpu) == (None, True)
    monkeypatch.setattr(trainer_mod, "bf16_agrees", lambda device: True)
    assert resolve_precision("auto", "auto", cpu) == (torch.bfloat16, False)  # AMX: bf16, matmul attention
    assert resolve_precision("none", "auto", cpu) == (None, True)
    assert resolve_precision("auto", "fused", cpu) == (torch.bfloat16, True)
    cfg = load_config([])
    model = build_mae(cfg.model, cfg.data)
    Trainer(model, mae_loss, OptimConfig.from_config(amp="auto", attention="auto"), 1, 8, cpu, progress=False)
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    with pytest.raises(ValueError, match="train.attention"):
        OptimConfig.from_config(attention="flash")


def test_this_cpus_bf16_block_agrees_with_fp32():
    assert trainer_mod.bf16_agrees(torch.device("cpu"))


def test_prefetched_stream_yields_the_plain_streams_batches():
    _, stream = _setup("micro", batch=8)
    plain = list(stream(5, 4, prefetch=0))
    ahead = list(stream(5, 4, prefetch=2))
    assert len(ahead) == 4
    for a, b in zip(plain, ahead):
        assert torch.equal(a.x, b.x) and torch.equal(a.vendor, b.vendor)
        assert torch.equal(a.latents.nan_to_num(-9), b.latents.nan_to_num(-9))


def test_a_failing_batch_is_raised_where_it_is_consumed():
    _, stream = _setup("micro", batch=8)

    def broken(step):
        if step == 2:
            raise RuntimeError("simulator broke at step 2")
        return step

    stream.batch = broken
    it = stream(0, 5, prefetch=2)
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(RuntimeError, match="step 2"):
        next(it)
