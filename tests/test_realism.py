"""Sites' private in vivo-like sets (mrsfm_model/data/realism.py): reproducible from a site's config
and seed, different from the shared simulated stream, configured for every site, and one clear line
for a bad setting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mrsfm_model.config import config_names
from mrsfm_model.data import realism as R
from mrsfm_model.data.io import load_folder
from mrsfm_model.data.quality import QualityConfig

SMALL = ["site.realism.spectra=12", "site.realism.transients=8"]
ALL_OFF = [f"site.realism.artifacts.{a}.scans=0" for a in R.ARTIFACTS]


def arrays(rset: R.RealisticSet) -> np.ndarray:
    return np.stack([np.concatenate([s.fid[0], s.fid[-1]]) for s in rset.spectra])


def test_a_sites_set_is_a_function_of_its_config_and_seed():
    a = R.site_set("hcfmrp", SMALL)
    b = R.site_set("hcfmrp", SMALL)
    c = R.site_set("hcfmrp", [*SMALL, "site.realism.seed=7"])
    assert len(a) == 12 and [s.provenance.extra["profile"] for s in a.spectra] == ["press_siemens"] * 6 + [
        "megapress_siemens"] * 6
    assert np.array_equal(arrays(a), arrays(b)) and a.artifacts == b.artifacts
    assert not np.allclose(arrays(a), arrays(c))
    # edited spectra keep their rows; every spectrum's record names what it carries, with its settings
    assert [s.sub for s in a.spectra[-6:]] == [("OFF", "ON")] * 6
    assert all(set(rec) <= set(a.config.active) for rec in a.artifacts)
    assert any(a.artifacts) and all(s.provenance.extra["artifacts"] == rec for s, rec in zip(a.spectra, a.artifacts))
    # SMART-MRS's global random state is left as it was found
    np.random.seed(3)
    before = np.random.random()
    np.random.seed(3)
    R.site_set("unicamp", ["site.realism.spectra=2", "site.realism.transients=4"])
    assert np.random.random() == before


def test_turning_one_artifact_off_leaves_the_others_draws_alone():
    base = R.site_set("unicamp", SMALL)
    less = R.site_set("unicamp", [*SMALL, "site.realism.artifacts.spurious_echo.scans=0"])
    for x, y in zip(base.artifacts, less.artifacts):
        assert {k: v for k, v in x.items() if k != "spurious_echo"} == y
    clean = R.site_set("unicamp", [*SMALL, *ALL_OFF])
    assert not any(clean.artifacts)
    # the artifact-free spectra are the shared simulator's draws: equal where no artifact was drawn
    for s, c, rec in zip(base.spectra, clean.spectra, base.artifacts):
        assert np.allclose(s.fid, c.fid, atol=1e-6) == (not rec)


@pytest.mark.parametrize("site", ["unicamp", "hcfmrp", "einstein"])
def test_a_sites_set_differs_from_the_shared_stream(site):
    """A linear detector on seven spectral statistics (QC SNR and linewidth, NAA sharpness and
    dispersion, lipid band, baseline levels) tells the site's configured set from the shared stream on held-out spectra, and
    does not tell the same site's set with every artifact off (the control)."""
    words = ["site.realism.spectra=128"]
    rset = R.site_set(site, words)
    control = R.site_set(site, [*words, *ALL_OFF])
    shared = R.spectral_features(R.shared_stream_sample(rset.config, seed=5))
    site_auc = R.detector_auc(R.spectral_features(rset.spectra), shared)
    control_auc = R.detector_auc(R.spectral_features(control.spectra), shared)
    # measured over three seeds of each site: 0.79-0.91, the controls 0.47-0.54
    assert site_auc >= 0.72, (site, site_auc, control_auc)
    assert control_auc <= 0.62 and site_auc - control_auc >= 0.2, (site, site_auc, control_auc)


def test_the_lipid_site_has_more_lipid_than_the_shared_stream():
    """One artifact, one statistic: unicamp's scalp lipids raise the 1.1-1.6 ppm band."""
    rset = R.site_set("unicamp", ["site.realism.spectra=64"])
    lipid = R.FEATURES.index("lipid_ratio")
    ours = R.spectral_features(rset.spectra)[:, lipid]
    shared = R.spectral_features(R.shared_stream_sample(rset.config, seed=5))[:, lipid]
    carrying = ours[rset.carrying("lipid")]
    assert np.median(carrying) > 1.5 * np.median(shared), (np.median(carrying), np.median(shared))


def test_every_configured_site_has_a_realism_profile():
    sites = config_names("site")
    assert sites == R.realism_sites() and len(sites) >= 3
    mixes = {}
    for site in sites:
        cfg = R.site_realism(site)
        assert 100 <= cfg.spectra <= 1000, (site, cfg.spectra)  # hundreds: a hospital's set, not a stream
        assert cfg.profiles and cfg.active, site
        mixes[site] = (cfg.seed, tuple(cfg.active))
    assert len({seed for seed, _ in mixes.values()}) == len(sites)  # own seeds
    assert len({mix for _, mix in mixes.values()}) == len(sites)  # own mixes


@pytest.mark.parametrize("word,line", [
    ("+site.realism.artifacts.lipids.scans=0.2", "config site.realism.artifacts.lipids: unknown artifact"),
    ("site.realism.artifacts.lipid.amplitude=[-1.0,2.0]",
     "config site.realism.artifacts.lipid.amplitude: a strength cannot be negative, got [-1.0, 2.0]"),
    ("site.realism.artifacts.eddy_current.amplitude_hz=strong",
     "config site.realism.artifacts.eddy_current.amplitude_hz: expected tuple, got 'strong'"),
    ("site.realism.artifacts.noise.scans=1.5", "config site.realism.artifacts.noise.scans: a share between 0 and 1"),
    ("site.realism.artifacts.motion.phase_deg=-3", "config site.realism.artifacts.motion.phase_deg: a strength"),
    ("site.realism.artifacts.baseline.bases=two", "config site.realism.artifacts.baseline.bases: expected int"),
    ("site.realism.artifacts.line_broadening.hz=[8.0,2.0]",
     "config site.realism.artifacts.line_broadening.hz: a range [low, high] needs low <= high"),
    ("+site.realism.artifacts.lipid.strength=2", "config site.realism.artifacts.lipid.strength: unknown key"),
    ("site.realism.artifacts.lipid=0.5", "config site.realism.artifacts.lipid: expected a mapping"),
    ("site.realism.spectra=many", "config site.realism.spectra: expected int, got 'many'"),
    ("site.realism.profiles=[press_acme]", "config site.realism.profiles: unknown simulation profile 'press_acme'"),
])
def test_a_bad_setting_is_one_line_naming_its_key(word, line):
    with pytest.raises(ValueError) as err:
        R.site_realism("einstein", [word])
    message = str(err.value)
    assert message.startswith(line), message
    assert "\n" not in message


def test_the_set_written_as_a_sites_data_folder_loads_with_its_record(tmp_path):
    rset = R.site_set("einstein", ["site.realism.spectra=3", "site.realism.transients=4"])
    paths = R.write_realistic_set(rset, tmp_path / "einstein")
    spectra, errors = load_folder(tmp_path / "einstein")
    assert not errors and len(spectra) == len(paths) == 3
    assert [s.provenance.vendor for s in spectra] == ["GE", "GE", "Philips"]
    sidecar = json.loads(paths[0].with_name(paths[0].name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["site"] == "einstein" and sidecar["artifacts"] == rset.artifacts[0] and "NAA" in sidecar["truth"]


def test_the_qc_gate_is_reported_per_artifact():
    rset = R.site_set("hcfmrp", ["site.realism.spectra=6", "site.realism.transients=4"])
    rows = R.qc_report(rset)
    by = {r["artifact"]: r for r in rows}
    assert set(by) == {*rset.config.active, "none", "all"} and by["all"]["spectra"] == 6
    for name in rset.config.active:
        assert by[name]["spectra"] == len(rset.carrying(name))
    assert all(0 <= r["flagged"] <= r["spectra"] for r in rows) and by["all"]["median_snr"] > 5
    # a gate no spectrum passes flags every one, under each artifact it carries
    strict = R.qc_report(rset, QualityConfig(min_snr=1e9, max_linewidth_hz=None))
    assert all(r["flagged"] == r["spectra"] for r in strict)
    table = R.qc_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| hcfmrp | all | 6 |" in table
