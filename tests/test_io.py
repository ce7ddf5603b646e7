"""The real shipped files load with the right provenance, shapes and peak positions.

Why: every later step (canonical grid, spectrogram, vendor-invariance) trusts the reader; a mirrored
or misread spectrum would silently train on nonsense. NAA must land at 2.01 ppm on the canonical grid.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import DATA, INVIVO
from nifti_mrs.create_nmrs import gen_nifti_mrs
from nifti_mrs.nifti_mrs import NIFTI_MRS

from mrsfm_model.data.canonical import CanonicalGrid, to_canonical
from mrsfm_model.data.io import SUPPORTED_SUFFIXES, convert_files, load_folder, load_spectrum
from mrsfm_model.data.nifti import combine_coils, load_nifti_mrs_image
from mrsfm_model.data.spectrum import peak_ppm
from mrsfm_model.errors import MRSDataError

PHILIPS = INVIVO / "philips"
SIEMENS = INVIVO / "siemens"
NIFTI = DATA / "nifti_mrs"
PRESS = PHILIPS / "sub-01_PRESS_35_act.sdat"
MM = PHILIPS / "sub-01_MM_TI600_act.SDAT"
RDA = SIEMENS / "SVS_30.rda"
IMA = SIEMENS / "SVS_30.IMA"
RAW7T = NIFTI / "siemens7T_steam_metab_raw.nii.gz"
PROC7T = NIFTI / "siemens7T_steam_metab.nii.gz"
WREF7T = NIFTI / "siemens7T_steam_wref_raw.nii.gz"
MEGA = NIFTI / "synthetic_megapress_coil_dyn_edit.nii.gz"

# file, vendor, MHz, bandwidth Hz, points, TE ms, TR ms, original dims
EXPECTED = [
    (PRESS, "Philips", 127.7509, 2000.0, 2048, 35.0, 2000.0, []),
    (MM, "Philips", 127.7552, 2000.0, 2048, 30.0, 2000.0, []),
    (RDA, "Siemens", 123.2347, 1200.5, 1024, 30.0, 2000.0, []),
    (IMA, "Siemens", 123.2347, 1199.9, 1024, 30.0, 2000.0, []),
    (RAW7T, "Siemens", 297.2199, 12004.8, 4096, 11.0, 5000.0, ["DIM_COIL", "DIM_DYN"]),
    (PROC7T, "Siemens", 297.2199, 12004.8, 4095, 11.0, 5000.0, []),
    (WREF7T, "Siemens", 297.2199, 12004.8, 4096, 11.0, 5000.0, ["DIM_COIL", "DIM_DYN"]),
    (MEGA, None, 127.731, 5000.0, 4096, 68.0, 2000.0, ["DIM_COIL", "DIM_DYN", "DIM_EDIT"]),
]


@pytest.mark.parametrize("path,vendor,mhz,bw,points,te,tr,dims", EXPECTED, ids=[e[0].name for e in EXPECTED])
def test_provenance_and_shape(path, vendor, mhz, bw, points, te, tr, dims):
    spec = load_spectrum(path)
    p = spec.provenance
    assert p.source == str(path)
    assert p.vendor == vendor
    assert spec.spectrometer_mhz == pytest.approx(mhz, abs=1e-3) == p.spectrometer_mhz
    assert p.field_t == pytest.approx(mhz / 42.577, rel=1e-6)
    assert spec.bandwidth_hz == pytest.approx(bw, abs=0.1) == p.bandwidth_hz
    assert spec.points == points == p.points
    assert p.te_ms == pytest.approx(te) and p.tr_ms == pytest.approx(tr)
    assert p.dims == dims
    assert spec.sub == (("OFF", "ON") if "DIM_EDIT" in dims else ("avg",))
    assert spec.fid.shape == (len(spec.sub), points) and spec.fid.dtype == np.complex64
    assert np.all(np.isfinite(spec.fid)) and np.any(spec.fid)


@pytest.mark.parametrize("path", [PRESS, RDA, IMA, RAW7T, PROC7T], ids=lambda p: p.name)
def test_naa_at_2_01_ppm_on_canonical_grid(path):
    """Catches a mirrored (conjugated) or shifted spectrum: NAA must sit at 2.01 ppm."""
    canon = to_canonical(load_spectrum(path), CanonicalGrid.from_config())
    assert peak_ppm(canon, 1.8, 2.2) == pytest.approx(2.01, abs=0.05)
    # and the mirror image of NAA about water (7.29 ppm) must not be the taller one
    spec = np.abs(np.fft.fftshift(np.fft.fft(canon.fid[0])))
    ppm = CanonicalGrid.from_config().ppm()
    near = lambda c: spec[(ppm > c - 0.1) & (ppm < c + 0.1)].max()  # noqa: E731
    assert near(2.01) > 2 * near(2 * 4.65 - 2.01)


def test_philips_reference_attached_and_not_mirrored():
    spec = load_spectrum(PRESS)
    assert spec.reference is not None and spec.reference.shape == (2048,)
    assert spec.provenance.extra["reference_file"].endswith("sub-01_PRESS_35_ref.sdat")
    ref = np.abs(np.fft.fftshift(np.fft.fft(spec.reference)))
    assert spec.ppm_axis()[np.argmax(ref)] == pytest.approx(4.65, abs=0.1)  # water
    assert np.abs(spec.reference).max() > 10 * np.abs(spec.fid).max()  # unsuppressed water
    assert load_spectrum(MM).reference is None  # no *_ref sibling for the MM scan


def test_siemens_rda_and_dicom_hold_the_same_fid():
    rda, ima = load_spectrum(RDA), load_spectrum(IMA)
    np.testing.assert_allclose(rda.fid, ima.fid, rtol=1e-5, atol=1e-3 * np.abs(rda.fid).max())
    assert rda.provenance.sequence == "svs_se_30_LSTG"


def test_raw_7t_is_coil_combined_and_averaged_with_water_reference():
    spec = load_spectrum(RAW7T, keep_transients=True)
    assert spec.transients.shape == (16, 1, 4096)
    np.testing.assert_allclose(spec.fid, spec.transients.mean(axis=0), rtol=1e-4, atol=1e-12)
    assert spec.provenance.extra["n_coils"] == 4 and spec.provenance.extra["n_transients"] == 16
    assert spec.reference is not None and spec.reference.shape == (4096,)
    assert spec.provenance.extra["reference_file"].endswith(WREF7T.name)
    # combination is phase-coherent: the combined FID starts real and positive
    assert np.angle(spec.fid[0, 0]) == pytest.approx(0.0, abs=1e-3)
    # averaging 16 transients beats any single one on noise in the signal-free tail
    tail = slice(-400, None)
    assert np.std(spec.fid[0, tail]) < 0.5 * np.std(spec.transients[0, 0, tail])
    assert load_spectrum(RAW7T).transients is None


def test_mega_press_rows_follow_edit_condition_header():
    """The file's EditCondition says index 0 = ON, 1 = OFF: rows must come out as (OFF, ON)."""
    spec = load_spectrum(MEGA, keep_transients=True)
    assert spec.sub == ("OFF", "ON") and spec.edited
    assert spec.transients.shape == (3, 2, 4096)
    assert spec.provenance.extra["edit_order"] == "header"
    stored = np.asarray(NIFTI_MRS(str(MEGA)).image.data)[0, 0, 0, :, 0]  # points, dyn, edit
    np.testing.assert_allclose(spec.row("OFF"), np.conj(stored[:, :, 1]).mean(axis=1), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(spec.row("ON"), np.conj(stored[:, :, 0]).mean(axis=1), rtol=1e-4, atol=1e-3)


def _mega_image(edit_header: dict | None, on_index: int):
    """Synthetic edited data: NAA at 2.01 ppm, reduced in the ON condition (as a 1.9 ppm pulse does)."""
    n, bw, mhz = 2048, 2000.0, 127.7
    t = np.arange(n) / bw
    naa = np.exp((2j * np.pi * (2.01 - 4.65) * mhz - 15.0) * t)
    cr = np.exp((2j * np.pi * (3.02 - 4.65) * mhz - 15.0) * t)
    data = np.zeros((1, 1, 1, n, 2), np.complex64)
    for i in range(2):
        data[0, 0, 0, :, i] = (0.3 if i == on_index else 1.0) * naa + 0.8 * cr
    img = gen_nifti_mrs(data, 1 / bw, mhz, dim_tags=["DIM_EDIT", None, None])  # conjugates into storage
    if edit_header is not None:
        img.set_dim_tag("DIM_EDIT", "DIM_EDIT", header=edit_header)
    return img, data[0, 0, 0]


@pytest.mark.parametrize("on_index", [0, 1])
def test_edit_order_from_header_and_from_naa_heuristic(on_index):
    labels = ["ON", "OFF"] if on_index == 0 else ["OFF", "ON"]
    for header, how in (({"EditCondition": labels}, "header"), (None, "naa_heuristic")):
        img, data = _mega_image(header, on_index)
        spec = load_nifti_mrs_image(img, "synthetic")
        assert spec.provenance.extra["edit_order"] == how
        np.testing.assert_allclose(spec.row("ON"), data[:, on_index], atol=1e-5)
        np.testing.assert_allclose(spec.row("OFF"), data[:, 1 - on_index], atol=1e-5)
        assert peak_ppm(spec, 1.8, 2.2, row="OFF") == pytest.approx(2.01, abs=0.02)


def _write_vax_sdat(path: Path, rows: np.ndarray) -> None:
    """Philips SDAT = VAX F-floats: IEEE single of 4x the value with its 16-bit halves swapped."""
    flat = np.stack([rows.real, rows.imag], axis=-1).ravel() * 4.0
    u = flat.astype("<f4").view("<u4")
    ((u >> 16) | (u << 16)).astype("<u4").tofile(path)


def test_philips_edited_sdat_rows_become_off_on(tmp_path):
    """A two-row MEGA SDAT: spec2nii would call the rows dynamics; they are the edit conditions."""
    n, bw, mhz = 2048, 2000.0, 127.750896
    t = np.arange(n) / bw
    naa = np.exp((2j * np.pi * (2.01 - 4.65) * mhz - 15.0) * t)
    cr = np.exp((2j * np.pi * (3.02 - 4.65) * mhz - 15.0) * t)
    rows = np.stack([0.3 * naa + 0.8 * cr, naa + 0.8 * cr])  # row 0 = ON (NAA partly saturated)
    _write_vax_sdat(tmp_path / "mega_act.sdat", rows)
    spar = PRESS.with_suffix(".spar").read_text()
    spar = spar.replace("rows : 1", "rows : 2").replace("scan_id : PRESS PAR 35", "scan_id : MEGA GABA 68")
    (tmp_path / "mega_act.spar").write_text(spar)
    spec = load_spectrum(tmp_path / "mega_act.sdat")
    assert spec.sub == ("OFF", "ON") and spec.provenance.dims == ["DIM_EDIT"]
    assert spec.provenance.extra["edit_order"] == "naa_heuristic"
    np.testing.assert_allclose(spec.row("ON"), rows[0], atol=1e-5)
    np.testing.assert_allclose(spec.row("OFF"), rows[1], atol=1e-5)
    assert peak_ppm(spec, 1.8, 2.2, row="OFF") == pytest.approx(2.01, abs=0.02)


def test_combine_coils_is_phase_coherent_and_snr_weighted():
    rng = np.random.default_rng(0)
    n, coils = 1024, 4
    t = np.arange(n) / 2000.0
    signal = np.exp((2j * np.pi * 50.0 - 20.0) * t)
    gains = np.array([1.0, 0.5, 0.2, 0.05]) * np.exp(1j * np.array([0.3, 2.0, -1.2, 3.0]))
    noise = 0.05 * (rng.standard_normal((coils, n)) + 1j * rng.standard_normal((coils, n)))
    x = gains[:, None] * signal + noise
    out = combine_coils(x, axis=0)
    assert out.shape == (n,)
    assert abs(np.angle(out[0])) < 0.05
    snr = lambda f: np.abs(f[:20]).mean() / np.std(f[-300:])  # noqa: E731
    assert snr(out) > snr(x[0])  # better than the best single coil
    assert snr(out) > snr(x.mean(axis=0))  # and than a phase-blind plain average


def test_convert_round_trip_keeps_data_and_provenance(tmp_path):
    written, errors = convert_files([PRESS, PRESS.with_name("sub-01_PRESS_35_ref.sdat"), RDA, PROC7T], tmp_path)
    assert errors == []
    assert [p.name for p in written] == [
        "sub-01_PRESS_35_act.nii.gz", "sub-01_PRESS_35_ref.nii.gz", "SVS_30.nii.gz", "siemens7T_steam_metab.nii.gz"]
    for src, out in zip([PRESS, RDA, PROC7T], [written[0], written[2], written[3]]):
        a, b = load_spectrum(src), load_spectrum(out)
        np.testing.assert_allclose(b.fid, a.fid, rtol=1e-6, atol=1e-6 * np.abs(a.fid).max())
        for key in ("vendor", "spectrometer_mhz", "bandwidth_hz", "points", "te_ms", "tr_ms", "dims", "sequence"):
            assert getattr(b.provenance, key) == getattr(a.provenance, key), key
        assert b.provenance.source == str(out)
        assert peak_ppm(to_canonical(b, CanonicalGrid.from_config())) == pytest.approx(2.01, abs=0.05)
    # spec2nii's header extension travels along; the water reference is re-attached after conversion
    hdr = NIFTI_MRS(str(written[0])).hdr_ext
    assert hdr["Manufacturer"] == "Philips" and hdr["OriginalFile"] == ["sub-01_PRESS_35_act.sdat"]
    np.testing.assert_allclose(load_spectrum(written[0]).reference, load_spectrum(PRESS).reference, rtol=1e-6)


def test_convert_reports_bad_inputs_and_goes_on(tmp_path):
    bad = tmp_path / "broken.rda"
    bad.write_text("nonsense")
    written, errors = convert_files([bad, RDA], tmp_path / "out")
    assert [p.name for p in written] == ["SVS_30.nii.gz"]
    assert len(errors) == 1 and "broken.rda" in str(errors[0])


def test_load_folder_mixes_good_and_bad(tmp_path):
    for f in PHILIPS.glob("sub-01_PRESS_35_*"):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "siemens").mkdir()
    shutil.copy(RDA, tmp_path / "siemens" / RDA.name)
    shutil.copy(RAW7T, tmp_path / "siemens" / RAW7T.name)
    shutil.copy(WREF7T, tmp_path / "siemens" / WREF7T.name)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "bad" / "cut.sdat").write_bytes(PRESS.read_bytes()[:1000])
    shutil.copy(PRESS.with_suffix(".spar"), tmp_path / "bad" / "cut.spar")
    (tmp_path / "bad" / "garbage.rda").write_text("hello")
    (tmp_path / "README.md").write_text("not data, ignored")
    (tmp_path / "meta.json").write_text("{}")

    spectra, errors = load_folder(tmp_path)
    names = [Path(s.provenance.source).name for s in spectra]
    # sorted by path; the water references are attached, not loaded on their own
    assert names == ["SVS_30.rda", RAW7T.name, "sub-01_PRESS_35_act.sdat"]
    assert spectra[1].reference is not None and spectra[2].reference is not None
    assert all(isinstance(e, MRSDataError) for e in errors)
    assert sorted(Path(e.path).name for e in errors) == ["cut.sdat", "empty.nii.gz", "garbage.rda"]
    for e in errors:
        assert Path(e.path).name in str(e) and e.problem
    with pytest.raises(MRSDataError, match="does not exist"):
        load_folder(tmp_path / "nothing_here")


def test_empty_folder_is_not_an_error(tmp_path):
    assert load_folder(tmp_path) == ([], [])


def test_supported_suffixes_are_lower_case():
    assert all(s == s.lower() and s.startswith(".") for s in SUPPORTED_SUFFIXES)
    assert {".nii.gz", ".nii", ".sdat", ".rda", ".ima", ".dcm", ".dat", ".7"} <= set(SUPPORTED_SUFFIXES)
