"""Issue 'done when': a tiny pretrain, resume, export and few-label fine-tune on CPU, end to end;
and the vendor benchmark carries no trivial shortcut."""

import json

import numpy as np
import pytest
import torch
from helpers import INVIVO

from mrsfm_model.config import load_config
from mrsfm_model.data.canonical import CanonicalGrid
from mrsfm_model.data.spectrogram import SpectrogramTransform
from mrsfm_model.evaluation.finetune import FinetuneConfig, run_benchmark
from mrsfm_model.evaluation.networks import (
    RANDOM_INIT,
    PooledFeatures,
    fit_probe,
    fold_probe_into_head,
    start_network,
)
from mrsfm_model.evaluation.stats import classification_metrics, mean_ci95, regression_metrics
from mrsfm_model.evaluation.tasks import BENCH_SEED_BASE, build_benchmark, shortcut_accuracy
from mrsfm_model.model.export import load_encoder
from mrsfm_model.model.mae import configured_mae
from mrsfm_model.training.pretrain import run_pretrain


@pytest.fixture(scope="module")
def bench():
    return build_benchmark(CanonicalGrid.from_config(), SpectrogramTransform(), ["OFF", "ON", "DIFF"], subjects_per_vendor=60,
                           scans_per_subject=2, test_fraction=0.5, seed=0)


def test_trivial_features_cannot_tell_vendors_apart(bench):
    assert bench.trivial[:, 0].unique().numel() == 1  # one length for everyone
    acc = shortcut_accuracy(bench)
    assert acc < 0.45, f"length/scale/noise/power predict the vendor ({acc:.2f}): a shortcut"


def test_split_is_by_subject_and_samples_are_stratified(bench):
    train_subjects = set(bench.subject[~bench.test].tolist())
    test_subjects = set(bench.subject[bench.test].tolist())
    assert train_subjects and test_subjects and not train_subjects & test_subjects
    idx = bench.labelled_sample(25, seed=3)
    assert len(idx) == 25 and not bench.test[idx].any()
    assert sorted(torch.bincount(bench.vendor[idx], minlength=3).tolist()) == [8, 8, 9]
    assert not torch.equal(idx, bench.labelled_sample(25, seed=4))
    assert torch.equal(idx, bench.labelled_sample(25, seed=3))


def test_spectrum_baseline_beats_chance_on_the_vendor_task(bench):
    """The yardstick: a linear model on magnitude spectra separates the vendors' basis sets."""
    from mrsfm_model.evaluation.finetune import baseline_metrics

    idx = bench.labelled_sample(90, seed=0)
    m = baseline_metrics(bench.spectra[idx], bench.vendor[idx], bench.spectra[bench.test], bench.vendor[bench.test],
                  "vendor", 3, 0.01)
    assert m["accuracy"] > 0.5


def test_benchmark_seeds_are_outside_the_pretraining_stream(monkeypatch):
    """Every seed the pretraining stream hands the simulator (many steps, every profile, denoising
    twins included) differs from every seed the benchmark's subjects and scans are drawn with, so
    pretraining never simulates a benchmark spectrum."""
    from mrsfm_model.data.simulate import Simulator
    from mrsfm_model.data.stream import build_stream

    seen: dict[str, set] = {"stream": set(), "bench": set()}
    who = "stream"
    real = Simulator.simulate

    def spy(self, n, seed=None, **kw):
        seen[who].add(int(seed))
        return real(self, n, seed=seed, **kw)

    monkeypatch.setattr(Simulator, "simulate", spy)
    cfg = load_config(["data.batch_size=6", "data.prefetch=0", "data.denoise=true"])
    stream = build_stream(cfg.data, seed=123)
    for step in (0, 1, 2, 10**6, 2**40):  # far steps too: the seed is drawn from (seed, step, profile)
        stream.batch(step)
    who = "bench"
    for seed in (0, 1, 2):
        build_benchmark(CanonicalGrid.from_config(), SpectrogramTransform(), ["OFF", "ON", "DIFF"], 4, 2, 0.5, seed)
    assert len(seen["stream"]) >= 5 * 6 and len(seen["bench"]) >= 3 * 3 * 3
    assert max(seen["stream"]) < 2**31 <= BENCH_SEED_BASE <= min(seen["bench"])
    assert not seen["stream"] & seen["bench"]


def test_metrics_on_known_values():
    m = classification_metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    r = regression_metrics(np.array([[1.0], [2.0], [3.0]]), np.array([[1.0], [2.0], [4.0]]), ["a"])
    assert r["mae_a"] == pytest.approx(1 / 3) and r["r2_a"] == pytest.approx(0.5)
    ci = mean_ci95([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["ci95"] == pytest.approx(4.303 * 1 / np.sqrt(3), rel=1e-3)


@pytest.mark.slow  # minutes of CPU on a slow machine: pretrain, resume, export, fine-tune
def test_tiny_pretrain_resume_export_and_finetune(tmp_path):
    run = tmp_path / "run"
    over = [f"run_dir={run}", "device=cpu", "train.steps=4", "train.checkpoint_every=2", "train.log_every=2",
            "data.batch_size=6", "data.sim_profiles=[megapress_ge,press_siemens]",
            f"data.invivo_dir={INVIVO / 'philips'}"]
    logs: list[str] = []
    run_pretrain(load_config(over), log=logs.append)
    for name in ("encoder.safetensors", "encoder.json", "metrics.jsonl", "training_curve.png", "reconstruction.png",
                 "checkpoints/last/model.safetensors", "checkpoints/last/trainer.pt"):
        assert (run / name).exists(), name
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    # resume: asking for 6 steps continues from step 4
    logs.clear()
    run_pretrain(load_config(over[:2] + ["train.steps=6"] + over[3:]), log=logs.append)
    assert any("resumed" in line and "step 4" in line for line in logs)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    card = json.loads((run / "encoder.json").read_text())
    assert card["trained_steps"] == 6 and card["data"]["invivo_spectra"] == 2
    vit = load_encoder(run / "encoder.safetensors", num_classes=3, global_pool="avg")
    assert vit(torch.zeros(1, 3, 64, 32)).shape == (1, 3)

    cfg = load_config(over + ["finetune.tasks=[vendor,quant]", "finetune.label_sizes=[6]", "finetune.seeds=[0,1]",
                              "finetune.steps=3", "finetune.quant_steps=3", "finetune.batch_size=6", "finetune.benchmark.subjects_per_vendor=6"])
    result = run_benchmark(cfg, run / "encoder.safetensors", tmp_path / "ft", torch.device("cpu"), log=logs.append)
    arms = {(r["task"], r["init"], r["mode"]) for r in result["rows"]}
    # 2 tasks x ((pretrained, random_init, scratch) x (linear, full) + spectrum and pixel baselines) + the fit
    # + the encoder's own latent head on quantification, as it is and calibrated
    assert len(arms) == 19 and ("quant", "baseline", "lcm_fit") in arms
    assert {("quant", "pretrained", "head"), ("quant", "pretrained", "head_cal")} <= arms
    paired = {(p["task"], p["arm"], p["minus"]) for p in result["paired"]}
    assert ("quant", "pretrained head", "baseline lcm_fit") in paired
    assert ("vendor", "pretrained full", "random_init full") in paired and ("vendor", "pretrained full", "baseline pixels") in paired
    first = next(p for p in result["paired"] if p["minus"] == "scratch full" and p["task"] == "vendor")
    rows = {(r["init"], r["mode"]): r for r in result["rows"] if r["task"] == "vendor"}
    assert first["per_seed"] == [a["accuracy"] - b["accuracy"] for a, b in
                                 zip(rows["pretrained", "full"]["per_seed"], rows["scratch", "full"]["per_seed"])]
    for r in result["rows"]:
        if r["task"] == "vendor":
            assert 0 <= r["metrics"]["accuracy"]["mean"] <= 1 and r["metrics"]["accuracy"]["n"] == 2
        else:
            assert "mae_GABA/tCr" in r["metrics"] and "r2_NAA/tCr" in r["metrics"]
    assert (tmp_path / "ft" / "finetune.json").exists() and (tmp_path / "ft" / "finetune.png").exists()
    assert any(line.startswith("task") for line in logs)  # the printed table
    assert not any("warning" in line for line in logs)
    # the same encoder on differently scaled images: refused before any number, naming both settings
    with pytest.raises(ValueError, match=r"data\.spectrogram\.scale: encoder 20\.0, this run 1\.0"):
        run_benchmark(load_config(over + ["finetune.tasks=[vendor]", "data.spectrogram.scale=1.0"]),
                      run / "encoder.safetensors", tmp_path / "ft2", torch.device("cpu"), log=logs.append)
    assert not (tmp_path / "ft2" / "finetune.json").exists()


def test_encoder_that_does_not_fit_the_data_config_is_refused(tmp_path):
    from mrsfm_model.model.export import export_encoder
    from mrsfm_model.model.mae import SpectroMAE, mae_config

    enc = export_encoder(SpectroMAE(mae_config("micro", img_size=(64, 64))), tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match="expects"):
        run_benchmark(load_config([]), enc, tmp_path / "ft", torch.device("cpu"))


def test_lp_ft_starts_the_full_fine_tune_from_the_linear_probe():
    """head_init=probe: the probe (BatchNorm + Linear on the pooled features) folded into the ViT's
    head gives the probe's own outputs, so LP-FT's first step starts where the probe ended."""
    cfg = load_config(["model=micro", "finetune.head_init=probe"])
    torch.manual_seed(0)
    vit = start_network(RANDOM_INIT, configured_mae(cfg.model, cfg.data), 3, "flat")
    x = torch.randn(24, *vit.patch_embed.img_size).unsqueeze(1).expand(-1, vit.patch_embed.proj.in_channels, -1, -1)
    x = x + 0.1 * torch.randn_like(x)
    y = torch.arange(24) % 3
    ft = FinetuneConfig.from_config(cfg.finetune, l2=[0.01])  # fixed: random labels, CV would pick "learn nothing"
    probe = fit_probe(vit, x, y, "classification", 3, ft.l2, torch.device("cpu"))
    with torch.no_grad():
        expected = probe(PooledFeatures(vit)(x))
        fold_probe_into_head(vit, probe)
        got = vit.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.1  # the probe learnt something to carry over
