"""Fine-tuning on a study's own labelled spectra: grouped CV, final model, predict, bad input.

The study is built from files, as a user has it: simulated GE and Siemens MEGA-PRESS spectra
written as NIfTI-MRS (6 subjects per vendor, 2 spectra per subject sharing a `group`) plus a
real Siemens RDA file, with a labels.csv naming them.

Where the time goes: the `fit` arm fits every spectrum of every run with a basis set (~0.5 CPU-s
each), and mode auto scores each read-out over the penalty grid. The tests that check the fit arm
keep it; the others switch it off (NO_FIT), and the grid is cut to three penalties.
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import INVIVO

from mrsfm_model.config import load_config
from mrsfm_model.data.simulate import write_simulated
from mrsfm_model.errors import MRSDataError
from mrsfm_model.evaluation.predict import predict_files
from mrsfm_model.evaluation.study import baseline_fit_predict, run_study
from mrsfm_model.evaluation.study_data import cv_folds, load_study
from mrsfm_model.model.export import export_encoder
from mrsfm_model.model.mae import SpectroMAE, mae_config

RDA = INVIVO / "siemens" / "SVS_30.rda"
# tiny training; water removal (HLSVD) off to keep loading fast: it is not what is tested here
OVERRIDES = ["device=cpu", "data.grid.remove_water=false", "++study.folds=3", "++study.seeds=[0,1]",
             "++study.steps=2", "++study.batch_size=8", "finetune.warmup_steps=1", "finetune.l2=[0.01,1.0,100.0]"]
NO_FIT = ["study.fit_arm=false"]  # where the fit arm is not what is tested: no basis-set fit of every spectrum
PER_VENDOR = 12  # simulated spectra per vendor (6 subjects x 2)
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models gain nothing from threads; on a shared CI box, idle-spinning threads cost 5-10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cfg():
    return load_config(OVERRIDES)


@pytest.fixture(scope="module")
def cfg_no_fit():
    return load_config(OVERRIDES + NO_FIT)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """DIR with 24 simulated spectra (12 subjects x 2) + 1 real RDA, and the rows of its labels.csv:
    GE rows first, then Siemens (PER_VENDOR each), then the RDA."""
    root = tmp_path_factory.mktemp("study")
    rows = []
    for vendor, profile, seed in (("GE", "megapress_ge", 11), ("Siemens", "megapress_siemens", 12)):
        for i, path in enumerate(write_simulated(profile, PER_VENDOR, root / "data" / vendor.lower(), seed=seed)):
            truth = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
            rows.append({"file": f"{vendor.lower()}/{path.name}", "group": f"{vendor}-sub{i // 2:02d}",
                         "vendor": vendor, "naa": f"{truth['concentrations_mM']['NAA']:.4f}"})
    (root / "data" / "real").mkdir()
    shutil.copy(RDA, root / "data" / "real" / RDA.name)
    rows.append({"file": f"real/{RDA.name}", "group": "real-01", "vendor": "Siemens", "naa": ""})
    return root, rows


@pytest.fixture(scope="module")
def encoder(cfg, tmp_path_factory):
    """An untrained micro encoder for the configured image: only the plumbing is under test."""
    torch.manual_seed(0)
    spec = cfg.data.spectrogram
    mae = SpectroMAE(mae_config("micro", img_size=(spec.height, spec.width), in_chans=len(cfg.data.channels)))
    return export_encoder(mae, tmp_path_factory.mktemp("enc") / "encoder.safetensors", {"trained_steps": 0})


def write_labels(path: Path, rows: list[dict], columns=("file", "group", "vendor", "naa")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_classification_grouped_cv_final_model_and_predict(cfg_no_fit, study, encoder, tmp_path):
    """Every arm but `fit` (its classification is in the auto test, its regression in the next)."""
    root, rows = study
    n = 2 * PER_VENDOR + 1
    logs: list[str] = []
    res = run_study(cfg_no_fit, encoder, root / "data", write_labels(tmp_path / "labels.csv", rows), "vendor",
                    tmp_path / "out", CPU, log=logs.append)
    assert res["task"] == "classification" and res["labels"] == ["GE", "Siemens"]
    assert f"real/{RDA.name}" in res["files"] and res["data"]["spectra"] == n  # the vendor file loads
    assert res["data"]["vendors"] == {"GE": PER_VENDOR, "Siemens": PER_VENDOR + 1}
    # grouped: no group on both sides of any split; stratified: both classes in every test fold
    groups, labels = np.array(res["groups"]), np.array([r["vendor"] for r in rows])
    assert res["cv"]["folds"] == 3 and set(res["cv"]["assignments"]) == {"0", "1"}
    for fold in map(np.array, res["cv"]["assignments"].values()):
        assert all(len(set(fold[groups == g])) == 1 for g in set(groups))
        assert all(set(labels[fold == f]) == {"GE", "Siemens"} for f in range(3))
    assert not np.array_equal(*map(np.array, res["cv"]["assignments"].values()))  # seeds re-split
    assert set(res["arms"]) == {"pretrained", "random_init", "scratch", "baseline"}  # study.fit_arm=false
    for arm in ("pretrained", "random_init", "scratch", "baseline"):
        assert set(res["arms"][arm]["metrics"]) == {"accuracy", "balanced_accuracy", "macro_f1"}
        assert res["arms"][arm]["metrics"]["accuracy"]["n"] == 2
    assert np.sum(res["arms"]["pretrained"]["confusion"]) == n * 2
    assert res["arms"]["baseline"]["metrics"]["accuracy"]["mean"] > 0.6  # chance is 0.5
    assert any(line.startswith("arm") and "balanced_accuracy" in line for line in logs)  # the table
    out = tmp_path / "out"
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "study.json").read_text())["headline"] == "pretrained"
    card = json.loads((out / "model.json").read_text())
    assert card["encoder"]["sha256"] and card["labels"] == ["GE", "Siemens"] and card["inputs"]["channels"]
    assert card["cv"]["headline"]["balanced_accuracy"]["n"] == 2 and card["data"]["class_counts"]["GE"] == PER_VENDOR

    preds, errors = predict_files(out / "model.safetensors", [root / "data"], tmp_path / "p.csv", CPU)
    assert errors == [] and len(preds) == n
    assert all(p["prediction"] in ("GE", "Siemens") for p in preds)
    assert all(p["prob_GE"] + p["prob_Siemens"] == pytest.approx(1.0, abs=1e-5) for p in preds)
    with open(tmp_path / "p.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == n and list(table[0]) == ["file", "prediction", "prob_GE", "prob_Siemens"]


def test_regression_on_a_numeric_column(cfg, study, tmp_path):
    root, rows = study
    logs: list[str] = []
    res = run_study(cfg, None, root / "data", write_labels(tmp_path / "labels.csv", rows), "naa", tmp_path / "out",
                    CPU, log=logs.append)
    assert res["task"] == "regression" and set(res["arms"]) == {"scratch", "baseline", "fit"}
    assert set(res["arms"]["scratch"]["metrics"]) == {"mae", "r2"}
    assert any(RDA.name in w and "no value" in w for w in res["warnings"])  # its empty naa: dropped
    assert res["data"]["spectra"] == 2 * PER_VENDOR and res["encoder"]["init"].startswith("random")
    preds, errors = predict_files(tmp_path / "out" / "model.safetensors", [root / "data" / "ge"], None, CPU)
    assert len(preds) == PER_VENDOR and not errors and all(np.isfinite(p["prediction"]) for p in preds)


def test_token_pooling_is_kept_in_the_study_model(study, tmp_path):
    from mrsfm_model.evaluation.predict import load_study_model

    root, rows = study
    cfg = load_config(OVERRIDES + NO_FIT + ["++study.seeds=[0]", "finetune.global_pool=token", "study.mode=full"])
    res = run_study(cfg, None, root / "data", write_labels(tmp_path / "labels.csv", rows), "vendor", tmp_path / "out",
                    CPU, log=lambda m: None)
    assert set(res["arms"]) == {"scratch", "baseline"}  # study.fit_arm=false: no fit arm
    model, meta = load_study_model(tmp_path / "out" / "model.safetensors")
    assert meta["global_pool"] == "token" and model.global_pool == "token"
    x = torch.randn(2, 3, cfg.data.spectrogram.height, cfg.data.spectrogram.width)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(model(x), model.head(feats[:, 0]), atol=1e-6)  # the [CLS] token, not the mean
        assert not torch.allclose(model(x), model.head(feats[:, 1:].mean(1)), atol=1e-3)
    from mrsfm_model.evaluation.finetune import FinetuneConfig

    with pytest.raises(ValueError, match="global_pool"):
        FinetuneConfig.from_config({"global_pool": "max"})


def _problem(cfg, root, tmp_path, rows, target="vendor", columns=("file", "group", "vendor", "naa")) -> str:
    with pytest.raises(MRSDataError) as exc:
        load_study(cfg, root / "data", write_labels(tmp_path / "labels.csv", rows, columns), target, log=lambda m: None)
    return str(exc.value)


def test_bad_rows_are_dropped_with_a_warning_each(cfg, study, tmp_path):
    root, rows = study
    base = rows[:6] + rows[PER_VENDOR:PER_VENDOR + 6]  # 3 GE + 3 Siemens subjects
    (root / "data" / "broken.nii.gz").write_bytes(b"not a spectrum")
    outside = root / "elsewhere2.nii.gz"  # real spectra, but not in the study's folder
    for name in ("elsewhere.nii.gz", outside.name):
        shutil.copy(root / "data" / rows[4]["file"], root / name)
    bad = [{**rows[0], "file": "ge/missing.nii.gz"}, {**rows[1], "vendor": "NaN"}, {**rows[2], "vendor": ""},
           dict(rows[3]), {"file": "broken.nii.gz", "group": "x", "vendor": "GE"},
           {"file": "../elsewhere.nii.gz", "group": "y", "vendor": "GE"},
           {"file": str(outside), "group": "z", "vendor": "GE"}]
    logs: list[str] = []
    data = load_study(load_config(OVERRIDES + NO_FIT), root / "data",
                      write_labels(tmp_path / "labels.csv", base + bad), "vendor", log=logs.append)
    text = "\n".join(logs)
    assert "ge/missing.nii.gz" in text and "not found" in text  # missing file, named
    assert "line 14" in text and "line 15" in text and "no value for 'vendor'" in text  # NaN / empty label
    assert f"{rows[3]['file']!r} is listed 2 times" in text  # duplicate reported
    assert "broken.nii.gz cannot be used" in text  # unreadable file, with the loader's reason
    assert "'../elsewhere.nii.gz' is outside" in text and f"{str(outside)!r} is outside" in text  # confined
    assert all(line.startswith("warning: ") for line in logs)
    assert len(data) == 12 and sorted(data.labels) == ["GE", "Siemens"]  # the good rows are used
    (root / "data" / "broken.nii.gz").unlink()


def test_tables_that_cannot_work_are_refused_with_the_reason(cfg, study, tmp_path):
    root, rows = study
    msg = _problem(cfg, root, tmp_path, rows[:4], target="diagnosis")
    assert "no column 'diagnosis'" in msg and "vendor, naa" in msg  # names it, lists the available ones
    assert "single class ('GE'" in _problem(cfg, root, tmp_path, rows[:6])
    assert "no 'file' column" in _problem(cfg, root, tmp_path, rows[:4], columns=("group", "vendor"))
    assert "single subject/group" in _problem(cfg, root, tmp_path, rows[:4] + rows[PER_VENDOR:PER_VENDOR + 2])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(MRSDataError, match="is empty"):
        load_study(cfg, root / "data", tmp_path / "empty.csv", "vendor", log=lambda m: None)
    (tmp_path / "header.csv").write_text("file,vendor\n")
    with pytest.raises(MRSDataError, match="no rows"):
        load_study(cfg, root / "data", tmp_path / "header.csv", "vendor", log=lambda m: None)
    all_missing = [{**r, "file": f"nope{i}.nii.gz"} for i, r in enumerate(rows[:4])]
    assert "no usable rows" in _problem(cfg, root, tmp_path, all_missing)


def test_predict_refuses_foreign_model_files_and_reports_unreadable_inputs(cfg, study, encoder, tmp_path):
    root, rows = study
    with pytest.raises(MRSDataError, match="pretrained encoder, not a fine-tuned study model"):
        predict_files(encoder, [root / "data"], None, CPU)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(MRSDataError, match="not a model file"):
        predict_files(tmp_path / "junk.safetensors", [root / "data"], None, CPU)
    with pytest.raises(MRSDataError, match="not found"):
        predict_files(tmp_path / "none.safetensors", [root / "data"], None, CPU)
    sub = rows[:6] + rows[PER_VENDOR:PER_VENDOR + 6]
    run_study(load_config(OVERRIDES + NO_FIT + ["++study.seeds=[0]"]), None, root / "data",
              write_labels(tmp_path / "labels.csv", sub), "vendor", tmp_path / "out", CPU, log=lambda m: None)
    (tmp_path / "bad.rda").write_text("garbage")
    good = root / "data" / sub[0]["file"]
    preds, errors = predict_files(tmp_path / "out" / "model.safetensors", [good, tmp_path / "bad.rda"], None, CPU)
    assert [p["file"] for p in preds] == [str(good)]
    assert len(errors) == 1 and errors[0].path.endswith("bad.rda") and "RDA" in errors[0].problem


def test_cv_folds_keep_groups_together_and_spread_classes():
    y = np.repeat([0, 1, 2], 12)
    groups = np.array([f"s{i // 3}" for i in range(36)])  # 12 subjects of 3 spectra
    fold = cv_folds(y, groups, 4, seed=0)
    assert all(len(set(fold[groups == g])) == 1 for g in set(groups))
    assert all(np.bincount(y[fold == f], minlength=3).tolist() == [3, 3, 3] for f in range(4))
    assert np.array_equal(fold, cv_folds(y, groups, 4, seed=0))
    values = np.linspace(0, 1, 36)
    fold_r = cv_folds(values, groups, 3, seed=1, task="regression")
    assert all(len(set(fold_r[groups == g])) == 1 for g in set(groups)) and set(fold_r) == {0, 1, 2}


def test_baseline_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = rng.normal(size=(40, 30))
    x[:, 0] += 3 * (2 * y - 1)  # one informative feature among noise
    prob = baseline_fit_predict(x[:30], y[:30], x[30:], "classification", 2, 0.01)
    assert np.allclose(prob.sum(1), 1) and (prob.argmax(1) == y[30:]).mean() >= 0.8
    pred = baseline_fit_predict(x[:30], 2 * x[:30, 1], x[30:], "regression", 0, 1e-4)
    assert np.corrcoef(pred, 2 * x[30:, 1])[0, 1] > 0.9


def test_scratch_architecture_is_the_configured_model():
    """From random weights the study builds exactly `model/` for the configured image (same as pretraining)."""
    from mrsfm_model.data.stream import InputBuilder
    from mrsfm_model.evaluation.networks import architecture
    from mrsfm_model.model.mae import build_mae

    cfg = load_config(["model.embed_norm=true", "model.patch_size=[4,4]"])
    got = architecture(cfg, None, InputBuilder.from_data_config(cfg.data))
    assert got == build_mae(cfg.model, cfg.data).cfg and got.embed_norm and got.patch_size == (4, 4)


def test_auto_picks_a_frozen_readout_per_fold_and_predict_rebuilds_it(cfg, tmp_path):
    """`mrsfm simulate --study` writes a labelled control-vs-lesion study; mode auto (the default)
    records which read-out each fold chose, and the saved model predicts exactly as it was fitted.
    The fit arm of a classification is checked here (the first run keeps study.fit_arm)."""
    from mrsfm_model.data.cohort import write_cohort
    from mrsfm_model.evaluation.predict import load_study_model

    labels = write_cohort(["press_ge", "press_siemens"], 8, tmp_path / "data")
    rows = list(csv.DictReader(open(labels)))
    assert len(rows) == 16 and {r["condition"] for r in rows} == {"control", "lesion"}
    lesion = [float(r["NAA/tCr"]) for r in rows if r["condition"] == "lesion"]
    control = [float(r["NAA/tCr"]) for r in rows if r["condition"] == "control"]
    assert np.mean(lesion) < np.mean(control)  # the lesion lowers NAA
    auto = load_config(OVERRIDES + ["++study.seeds=[0]"])
    assert auto.study.mode == "auto"
    torch.manual_seed(0)
    spec = auto.data.spectrogram
    mae = SpectroMAE(mae_config("micro", img_size=(spec.height, spec.width), in_chans=len(auto.data.channels)))
    enc = export_encoder(mae, tmp_path / "enc.safetensors", {"trained_steps": 0})
    res = run_study(auto, enc, tmp_path / "data", labels, "condition", tmp_path / "out", CPU, log=lambda m: None)
    for arm in ("pretrained", "random_init", "scratch"):
        assert {f["mode"] for f in res["arms"][arm]["per_fold"]} <= {"linear", "latent"}
    assert res["final_mode"] in ("linear", "latent")
    # what an MRS user does: fit each spectrum, then classify its fitted ratios, on the same folds
    fit = res["arms"]["fit"]
    assert set(fit["metrics"]) == {"accuracy", "balanced_accuracy", "macro_f1"}
    assert fit["metrics"]["balanced_accuracy"]["n"] == 1 and "mode" not in fit["per_fold"][0]
    assert [f["n_test"] for f in fit["per_fold"]] == [f["n_test"] for f in res["arms"]["scratch"]["per_fold"]]
    for mode in ("latent", "linear"):
        one = load_config(OVERRIDES + NO_FIT + ["++study.seeds=[0]", f"study.mode={mode}"])
        res = run_study(one, enc, tmp_path / "data", labels, "condition", tmp_path / mode, CPU, log=lambda m: None)
        model, meta = load_study_model(tmp_path / mode / "model.safetensors")
        assert meta["mode"] == mode == res["final_mode"]
        data = load_study(one, tmp_path / "data", labels, "condition", log=lambda m: None)
        from mrsfm_model.evaluation.study import DeepSetup, train_deep
        from mrsfm_model.evaluation.study_data import StudyConfig

        scfg = StudyConfig.from_config(one.study)
        setup = DeepSetup(enc, mae.cfg, scfg.finetune(one), CPU)
        fitted, _, _ = train_deep(data.x, data.y, data.task, data.n_classes, setup, scfg.seeds[0], data.groups)
        with torch.no_grad():
            assert torch.allclose(model(data.x), fitted(data.x), atol=1e-5)


def test_latent_mode_needs_a_latent_head(cfg, study, tmp_path):
    root, rows = study
    torch.manual_seed(0)
    spec = cfg.data.spectrogram
    mae = SpectroMAE(mae_config("micro", img_size=(spec.height, spec.width), in_chans=len(cfg.data.channels),
                                latent_weight=0.0))
    enc = export_encoder(mae, tmp_path / "nohead.safetensors", {"trained_steps": 0})
    one = load_config(OVERRIDES + ["study.mode=latent"])
    with pytest.raises(ValueError, match="latent head"):
        run_study(one, enc, root / "data", write_labels(tmp_path / "labels.csv", rows), "vendor", tmp_path / "o",
                  CPU, log=lambda m: None)


def test_fit_features_are_the_fitted_ratios_of_each_spectrum(study, cfg):
    """The `fit` arm's features: each spectrum fitted with its vendor's MEGA-PRESS basis set; the
    fitted log NAA/tCr follows the simulator's truth across subjects."""
    from mrsfm_model.data.io import load_spectrum
    from mrsfm_model.data.latents import RATIOS
    from mrsfm_model.data.stream import InputBuilder
    from mrsfm_model.evaluation.lcm import fit_profile, fit_ratio_features

    root, rows = study
    builder = InputBuilder.from_data_config(cfg.data)
    sim_rows = [r for r in rows if r["naa"]][PER_VENDOR - 6:PER_VENDOR + 6]  # 6 GE, then 6 Siemens
    spectra = [builder.canonical(load_spectrum(root / "data" / r["file"])) for r in sim_rows]
    assert {fit_profile(s.edited, s.provenance.vendor) for s in spectra} == {"megapress_ge", "megapress_siemens"}
    feats = fit_ratio_features(spectra, builder.grid)
    assert feats.shape == (12, len(RATIOS)) and np.isfinite(feats).all()
    truth = []
    for r in sim_rows:
        c = json.loads((root / "data" / r["file"].replace(".nii.gz", ".json")).read_text())["concentrations_mM"]
        truth.append(np.log((c["NAA"] + c.get("NAAG", 0)) / (c["Cr"] + c["PCr"])))
    assert np.corrcoef(feats[:, list(RATIOS).index("tNAA")], truth)[0, 1] > 0.7
    assert fit_profile(False, None) == "press_ge" and fit_profile(True, "Philips") == "megapress_philips"
