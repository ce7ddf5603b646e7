"""The `mrsfm` command line as a user types it: output, files, one-line errors, exit codes."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import INVIVO

from mrsfm_model.cli import main

PHILIPS = INVIVO / "philips" / "sub-01_PRESS_35_act.sdat"
RDA = INVIVO / "siemens" / "SVS_30.rda"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_has_the_promised_keys(capsys):
    code, out, _ = _run(capsys, "inspect", PHILIPS, "--json")
    info = json.loads(out)
    assert code == 0
    assert {"vendor", "spectrometer_frequency_mhz", "bandwidth_hz", "points", "dims", "naa_ppm"} <= set(info)
    assert info["vendor"] == "Philips" and info["points"] == 2048 and info["bandwidth_hz"] == 2000.0
    assert info["spectrometer_frequency_mhz"] == pytest.approx(127.75, abs=0.01)
    assert info["naa_ppm"] == pytest.approx(2.01, abs=0.05)
    assert info["snr"] > 50 and 5 < info["naa_fwhm_hz"] < 30  # 64 averages at 3 T: a good spectrum


def test_inspect_text_and_png(capsys, tmp_path):
    code, out, err = _run(capsys, "inspect", RDA, "--png", tmp_path / "f.png")
    assert code == 0 and "Siemens" in out and "naa_ppm" in out
    png = (tmp_path / "f.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.parametrize("content", [b"", b"not an mrs file at all", b"\x00" * 100])
def test_inspect_bad_file_is_one_line_naming_it(capsys, tmp_path, content):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(content)
    code, out, err = _run(capsys, "inspect", bad)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "broken.nii.gz" in lines[0] and "Traceback" not in err


def test_bad_config_override_is_named(capsys):
    code, _, err = _run(capsys, "inspect", RDA, "data.spectrogram.hop=abc")
    assert code == 2 and "data.spectrogram.hop" in err and "Traceback" not in err


def test_convert_writes_good_files_and_reports_bad_ones(capsys, tmp_path):
    bad = tmp_path / "empty.rda"
    bad.write_bytes(b"")
    code, out, err = _run(capsys, "convert", PHILIPS, RDA, bad, "--out", tmp_path / "out")
    assert code == 1 and "empty.rda" in err
    written = sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz"))
    assert "SVS_30.nii.gz" in written and any(n.startswith("sub-01_PRESS_35_act") for n in written)
    code, out, _ = _run(capsys, "inspect", tmp_path / "out" / "SVS_30.nii.gz", "--json")
    assert code == 0 and json.loads(out)["vendor"] == "Siemens"


def test_simulate_writes_nifti_and_truth(capsys, tmp_path):
    code, out, _ = _run(capsys, "simulate", "--n", 3, "--profile", "megapress_philips", "--out", tmp_path, "--seed", 4)
    assert code == 0
    files = sorted(tmp_path.glob("*.nii.gz"))
    assert len(files) == 3 and len(list(tmp_path.glob("*.json"))) == 3
    truth = json.loads(files[0].with_name(files[0].name.replace(".nii.gz", ".json")).read_text())
    assert "GABA" in json.dumps(truth) and "Philips" in json.dumps(truth)
    code, out, _ = _run(capsys, "inspect", files[0], "--json")
    info = json.loads(out)
    assert code == 0 and info["vendor"] == "Philips" and "DIM_EDIT" in info["dims"]


def test_simulate_unknown_profile(capsys, tmp_path):
    code, _, err = _run(capsys, "simulate", "--n", 1, "--profile", "nosuch", "--out", tmp_path)
    assert code != 0 and "nosuch" in err and "press_ge" in err


def test_study_finetune_needs_all_three_arguments(capsys, tmp_path):
    code, _, err = _run(capsys, "finetune", "--data", tmp_path)
    assert code == 2 and "--labels" in err and "--target" in err


def test_a_study_defaults_to_the_study_encoder_and_the_benchmark_to_micro(capsys, tmp_path, monkeypatch):
    import mrsfm_model.evaluation.finetune as finetune
    import mrsfm_model.evaluation.study as study

    used = {}
    monkeypatch.setattr(study, "run_study", lambda cfg, encoder, *a, **k: used.setdefault("study", encoder))
    monkeypatch.setattr(finetune, "run_benchmark", lambda cfg, encoder, *a, **k: used.setdefault("bench", encoder))
    assert _run(capsys, "finetune", "--data", tmp_path, "--labels", tmp_path / "l.csv", "--target", "t")[0] == 0
    assert _run(capsys, "finetune", "--out", tmp_path / "b")[0] == 0
    assert Path(used["study"]).name == "mrsfm_tiny.safetensors"  # chosen on validation studies (screen 16)
    assert Path(used["bench"]).name == "mrsfm_micro.safetensors"


def test_predict_refuses_an_encoder_as_model(capsys, tmp_path):
    from mrsfm_model.model.export import export_encoder
    from mrsfm_model.model.mae import SpectroMAE, mae_config

    enc = export_encoder(SpectroMAE(mae_config("micro")), tmp_path / "enc.safetensors")
    code, _, err = _run(capsys, "predict", "--model", enc, RDA)
    assert code == 1 and "enc.safetensors" in err and "Traceback" not in err


def test_quantify_estimates_simulated_files_near_their_truth_and_names_a_bad_file(capsys, tmp_path):
    """The shipped model's own head, no labels: NAA/tCr of spectra it never saw (seeds above the
    pretraining stream's), read from NIfTI-MRS files as a user's would be."""
    sim = tmp_path / "sim"
    assert _run(capsys, "simulate", "--n", "8", "--profile", "megapress_siemens", "--out", sim,
                "--seed", 2**40 + 11)[0] == 0
    (sim / "broken.nii.gz").write_bytes(b"not a nifti file")
    code, out, err = _run(capsys, "quantify", sim)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "broken.nii.gz" in err
    assert len(rows) == 8 and {"GABA/tCr", "tNAA/tCr", "lorentzian_hz", "snr"} <= set(rows[0])
    assert not {"phase0", "water"} & set(rows[0])  # magnitude images carry no phase; the grid removed the water
    est, truth = [], []
    for r in rows:
        c = json.loads(Path(r["file"].removesuffix(".nii.gz") + ".json").read_text())["concentrations_mM"]
        truth.append((c["NAA"] + c["NAAG"]) / (c["Cr"] + c["PCr"]))
        est.append(float(r["tNAA/tCr"]))
    est, truth = np.array(est), np.array(truth)
    assert np.abs(est - truth).mean() < 0.5 * np.abs(truth - truth.mean()).mean()  # far better than a constant


def test_quantify_refuses_an_encoder_without_a_head(capsys, tmp_path):
    from mrsfm_model.model.export import export_encoder
    from mrsfm_model.model.mae import SpectroMAE, mae_config

    enc = export_encoder(SpectroMAE(mae_config("micro", latent_weight=0.0)), tmp_path / "plain.safetensors")
    code, _, err = _run(capsys, "quantify", "--encoder", enc, RDA)
    assert code == 1 and "plain.safetensors" in err and "no latent head" in err and "Traceback" not in err
