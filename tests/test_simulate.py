"""Basis readers (three formats) and the batched simulator, on the CPU."""

from __future__ import annotations

import dataclasses
import json
import math

import h5py
import numpy as np
import pytest
import torch

from mrsfm_model.data.basis import load_basis
from mrsfm_model.data.canonical import CanonicalGrid
from mrsfm_model.data.simulate import (
    BASIS_DIR,
    SimProfile,
    Simulator,
    available_profiles,
    load_profile,
    write_simulated,
)
from mrsfm_model.data.spectrum import peak_ppm
from mrsfm_model.errors import MRSDataError

GRID = CanonicalGrid.from_config()
PPM = GRID.ppm()
BIN_PPM = GRID.bandwidth_hz / GRID.points / GRID.spectrometer_mhz
BASES = {
    "h5_ge": "megapress_te68_vendor/basis_ge_megapress_gaba_te68.h5",
    "h5_philips": "megapress_te68_vendor/basis_philips_megapress_gaba_te68.h5",
    "h5_siemens": "megapress_te68_vendor/basis_siemens_megapress_gaba_te68.h5",
    "fida": "megapress_te68_fida",
    "lcm_ge": "press_te35_vendor/3T_PRESS_GE_35ms_noMM.BASIS",
    "lcm_philips": "press_te35_vendor/3T_PRESS_Philips_35ms_noMM.BASIS",
    "lcm_siemens": "press_te35_vendor/3T_PRESS_Siemens_35ms_noMM.BASIS",
}
EDITED = {k for k in BASES if not k.startswith("lcm")}
PROFILES = ["press_ge", "press_philips", "press_siemens", "megapress_ge", "megapress_philips",
            "megapress_siemens", "megapress_fida"]
QUIET = {"water": 0.0, "baseline": 0.0, "phase0": 0.0, "phase1": 0.0}  # nothing but metabolites + noise


def spectrum(fid) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft(np.asarray(fid), axis=-1), axes=-1)


def tallest(fid, lo: float, hi: float, part=np.real) -> float:
    m = (PPM >= lo) & (PPM <= hi)
    return float(PPM[m][np.argmax(part(spectrum(fid))[..., m])])


@pytest.fixture(scope="module")
def bases():
    return {k: load_basis(BASIS_DIR / p, GRID) for k, p in BASES.items()}


@pytest.fixture(scope="module")
def sims():
    return {}


def sim_for(sims: dict, name: str) -> Simulator:
    if name not in sims:
        sims[name] = Simulator(name, GRID, device="cpu")
    return sims[name]


# --------------------------------------------------------------------------- basis readers
@pytest.mark.parametrize("key", list(BASES))
def test_basis_names_shapes_and_peak_positions(bases, key):
    b = bases[key]
    assert b.sub == (("OFF", "ON") if key in EDITED else ("avg",))
    assert b.sequence == ("MEGA-PRESS" if key in EDITED else "PRESS")
    assert b.te_ms == (68.0 if key in EDITED else 35.0)
    for name in ("NAA", "NAAG", "Cr", "PCr", "GABA", "Glu", "Gln", "mI", "GSH", "Tau", "GPC", "PCh"):
        assert name in b.names, name
    for rows in b.fids.values():
        assert rows.shape == (len(b.names), GRID.points) and rows.dtype == np.complex64
    off = b.fids[b.sub[0]]
    assert abs(tallest(off[b.index("NAA")], 1.8, 2.2) - 2.01) <= 0.05
    assert abs(tallest(off[b.index("Cr")], 2.8, 3.2) - 3.02) <= 0.05
    if key.startswith(("h5", "lcm")):
        assert b.vendor == key.split("_")[1].capitalize().replace("Ge", "GE")


def test_vendor_h5_has_its_own_macromolecules(bases):
    b = bases["h5_siemens"]
    assert {"MM09", "MM20", "Lip13", "MM3co"} <= set(b.macromolecules)
    assert "NAA" in b.metabolites and "MM09" not in b.metabolites and "-CrCH2" not in b.metabolites
    co = b.index("MM3co")
    assert np.abs(b.fids["OFF"][co]).max() == 0 and np.abs(b.fids["ON"][co]).max() > 0  # DIFF only


@pytest.mark.parametrize("key", sorted(EDITED))
def test_gaba_edited_peak_in_diff(bases, key):
    """DIFF = ON - OFF: GABA gives a positive edited peak near 3.0 ppm, NAA a negative 2.01 one."""
    b = bases[key]
    diff = b.fids["ON"] - b.fids["OFF"]
    gaba = spectrum(diff[b.index("GABA")]).real
    m = (PPM >= 2.8) & (PPM <= 3.2)
    assert gaba[m].max() > 2 * abs(gaba[m].min())
    assert abs(PPM[m][np.argmax(gaba[m])] - 3.0) <= 0.1
    naa = spectrum(diff[b.index("NAA")]).real
    m = (PPM >= 1.9) & (PPM <= 2.1)
    assert naa[m].min() < -0.5 * spectrum(b.fids["OFF"][b.index("NAA")]).real[m].max()


def test_basis_amplitude_scale_comparable_across_formats(bases):
    """1 mM Cr broadened to 6 Hz has a ~unit 3.03 ppm singlet in every format; NAA/Cr agree."""
    t = np.arange(GRID.points) / GRID.bandwidth_hz
    gauss = np.exp(-((np.pi * 6.0 * t) ** 2) / (4 * np.log(2)))
    for key, b in bases.items():
        off = b.fids[b.sub[0]]
        cr = spectrum(off[b.index("Cr")] * gauss).real[(PPM > 2.9) & (PPM < 3.15)].max()
        naa = spectrum(off[b.index("NAA")] * gauss).real[(PPM > 1.9) & (PPM < 2.1)].max()
        assert 0.75 < cr < 1.15, (key, cr)
        assert 0.8 < naa / cr < 1.25, (key, naa / cr)


def test_bad_basis_files_raise_clear_errors(tmp_path):
    with pytest.raises(MRSDataError, match="does not exist"):
        load_basis(tmp_path / "nope.h5", GRID)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(MRSDataError, match="junk.h5"):
        load_basis(tmp_path / "junk.h5", GRID)
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(MRSDataError, match="lacks"):
        load_basis(tmp_path / "empty.h5", GRID)
    src = (BASIS_DIR / BASES["lcm_ge"]).read_text()
    (tmp_path / "cut.BASIS").write_text(src[: len(src) // 3])
    with pytest.raises(MRSDataError, match="truncated|points"):
        load_basis(tmp_path / "cut.BASIS", GRID)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(MRSDataError, match="unknown basis format"):
        load_basis(tmp_path / "x.txt", GRID)
    (tmp_path / "folder").mkdir()
    with pytest.raises(MRSDataError, match="no FID-A"):
        load_basis(tmp_path / "folder", GRID)


# --------------------------------------------------------------------------- profiles
def test_profiles_exist_and_load():
    assert set(PROFILES) <= set(available_profiles())
    for name in PROFILES:
        p = load_profile(name)
        assert p.name == name and p.basis_path().exists()
        assert p.concentrations["NAA"] == (7.5, 17.0) and p.concentrations["GABA"] == (1.0, 2.0)
    with pytest.raises(FileNotFoundError, match="press_ge"):
        load_profile("no_such_profile")
    with pytest.raises(ValueError, match="unknown"):
        SimProfile.from_dict({"name": "x", "basis": "y", "typo_key": 1})


# --------------------------------------------------------------------------- simulator
@pytest.mark.parametrize("name,sub", [("press_siemens", ("avg",)), ("megapress_ge", ("OFF", "ON"))])
def test_shapes_dtypes_and_truth(sims, name, sub):
    sim = sim_for(sims, name)
    out = sim.simulate(16, seed=0)
    assert out.fid.shape == (16, len(sub), GRID.points) and out.fid.dtype == torch.complex64
    assert out.sub == sub and out.profile == name and out.vendor == sim.profile.vendor
    assert out.transients is None
    for key in ("snr", "lorentzian_hz", "gaussian_hz", "shift_hz", "phase0", "phase1", "norm_scale"):
        assert out.truth[key].shape == (16,)
    spec = torch.fft.fft(out.fid[:, 0]).abs()[:, torch.from_numpy(np.fft.ifftshift((PPM >= 1.8) & (PPM <= 4.0)))]
    assert torch.allclose(spec.amax(dim=1), torch.ones(16), atol=1e-4)  # normalised like grid.norm_factor


def test_reproducible_per_seed(sims):
    sim = sim_for(sims, "megapress_siemens")
    a, b, c = sim.simulate(8, seed=3), sim.simulate(8, seed=3), sim.simulate(8, seed=4)
    assert torch.equal(a.fid, b.fid)
    assert all(torch.equal(a.truth[k], b.truth[k]) for k in a.truth)
    assert not torch.allclose(a.fid, c.fid)
    assert not torch.equal(a.truth["NAA"], c.truth["NAA"])


@pytest.mark.parametrize("name", ["press_ge", "megapress_fida"])
def test_truth_inside_profile_ranges(sims, name):
    sim = sim_for(sims, name)
    out, p = sim.simulate(256, seed=1), sim.profile
    for m in out.metabolites:
        lo, hi = p.concentrations.get(m, p.other_concentration)
        assert lo - 1e-5 <= out.truth[m].min() and out.truth[m].max() <= hi + 1e-5, m
    for key, (lo, hi) in (("snr", p.snr), ("lorentzian_hz", p.lorentzian_hz), ("shift_hz", p.shift_hz),
                          ("phase0", p.phase0_deg), ("phase1", p.phase1_deg_per_ppm)):
        assert lo - 1e-4 <= out.truth[key].min() and out.truth[key].max() <= hi + 1e-4, key
    assert "H2O" not in out.metabolites and "Ref0ppm" not in out.metabolites


@pytest.mark.parametrize("name", PROFILES)
def test_naa_at_2_01_without_shift(sims, name):
    out = sim_for(sims, name).simulate(4, seed=2, fixed={"shift_hz": 0.0, "snr": 1e4, **QUIET})
    for spec in out.to_spectra():
        assert abs(peak_ppm(spec, 1.8, 2.2) - 2.01) <= 0.05


def test_shift_moves_naa_by_shift_over_mhz(sims):
    sim = sim_for(sims, "press_siemens")
    fixed = {"snr": math.inf, "lorentzian_hz": 1.0, "gaussian_hz": 2.0, **QUIET}
    idx = []
    for shift in (0.0, 10.0):
        fid = sim.simulate(1, seed=5, fixed={**fixed, "shift_hz": shift}).fid[0, 0].numpy()
        m = (PPM >= 1.9) & (PPM <= 2.2)
        idx.append(np.flatnonzero(m)[np.argmax(np.abs(spectrum(fid))[m])])
    expected_bins = 10.0 / GRID.spectrometer_mhz / BIN_PPM
    assert abs((idx[1] - idx[0]) - expected_bins) <= 1.0


def test_noise_matches_requested_snr(sims):
    sim = sim_for(sims, "megapress_philips")
    fixed = {"snr": 20.0, **QUIET}
    noisy = sim.simulate(256, seed=7, normalise=False, fixed=fixed).fid[:, 0].numpy()
    clean = sim.simulate(256, seed=7, normalise=False, fixed={**fixed, "snr": math.inf}).fid[:, 0].numpy()
    win = (PPM >= GRID.norm_ppm[0]) & (PPM <= GRID.norm_ppm[1])
    height = spectrum(clean).real[:, win].max(axis=1)
    edges = (PPM > 9.5) | (PPM < -0.5)  # no signal there: pure noise
    noise_std = spectrum(noisy).real[:, edges].std(axis=1)
    assert np.median(height / noise_std) == pytest.approx(20.0, rel=0.15)


def test_twice_the_naa_gives_twice_the_naa_area(sims):
    sim = sim_for(sims, "press_ge")
    others = {m: 0.0 for m in sim.metabolites + sim.mm_names if m != "NAA"}
    fixed = {**others, **QUIET, "snr": math.inf, "shift_hz": 0.0, "NAA": [6.0, 12.0],
             "lorentzian_hz": 4.0, "gaussian_hz": 5.0}
    fid = sim.simulate(2, seed=0, normalise=False, fixed=fixed).fid[:, 0].numpy()
    m = (PPM >= 1.85) & (PPM <= 2.15)
    area = spectrum(fid).real[:, m].sum(axis=1)
    assert area[1] / area[0] == pytest.approx(2.0, rel=0.01)
    # with every other metabolite present (same draws): the NAA contribution still doubles
    base = {**QUIET, "snr": math.inf, "shift_hz": 0.0, "lorentzian_hz": 4.0, "gaussian_hz": 5.0}
    a6 = spectrum(sim.simulate(1, seed=9, normalise=False, fixed={**base, "NAA": 6.0}).fid[0, 0].numpy()).real[m].sum()
    a12 = spectrum(sim.simulate(1, seed=9, normalise=False, fixed={**base, "NAA": 12.0}).fid[0, 0].numpy()).real[m].sum()
    assert (a12 - a6) == pytest.approx(area[0], rel=0.02)


def test_unknown_fixed_parameter_is_refused(sims):
    with pytest.raises(KeyError, match="not a parameter"):
        sim_for(sims, "press_ge").simulate(2, seed=0, fixed={"NAAA": 3.0})


def test_transients_average_to_the_fid():
    profile = dataclasses.replace(load_profile("megapress_siemens"), n_transients=8,
                                  drift_hz_per_transient=(0.1, 0.2), freq_jitter_hz=1.0, phase_jitter_deg=5.0)
    out = Simulator(profile, GRID, device="cpu").simulate(4, seed=1)
    assert out.transients.shape == (4, 8, 2, GRID.points)
    torch.testing.assert_close(out.transients.mean(dim=1), out.fid, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(out.transients[:, 0], out.transients[:, -1])  # drift + noise per transient
    spec = out.to_spectra()[0]
    assert spec.transients.shape == (8, 2, GRID.points) and "DIM_DYN" in spec.provenance.dims


def test_to_spectra_carries_provenance_and_truth(sims):
    out = sim_for(sims, "megapress_ge").simulate(3, seed=11)
    specs = out.to_spectra()
    assert len(specs) == 3 and specs[0].sub == ("OFF", "ON")
    p = specs[2].provenance
    assert p.source == "simulated:megapress_ge:11:2" and p.vendor == "GE" and p.te_ms == 68.0
    assert p.sequence == "MEGA-PRESS" and p.spectrometer_mhz == GRID.spectrometer_mhz
    truth = p.extra["truth"]
    assert isinstance(truth["NAA"], float) and truth["NAA"] == pytest.approx(float(out.truth["NAA"][2]))
    np.testing.assert_array_equal(specs[2].fid, out.fid[2].numpy())


def test_write_simulated_round_trips_through_nifti_mrs(tmp_path):
    from nifti_mrs.nifti_mrs import NIFTI_MRS

    from mrsfm_model.data.io import load_spectrum

    paths = write_simulated("megapress_siemens", 3, tmp_path / "mega", seed=5, grid=GRID, device="cpu")
    assert len(paths) == 3 and all(p.name.endswith(".nii.gz") and p.exists() for p in paths)
    img = NIFTI_MRS(str(paths[1]))
    assert img.shape == (1, 1, 1, GRID.points, 2) and img.dim_tags[0] == "DIM_EDIT"
    assert img.spectrometer_frequency[0] == pytest.approx(GRID.spectrometer_mhz)
    assert img.dwelltime == pytest.approx(1 / GRID.bandwidth_hz)
    assert img.hdr_ext["Manufacturer"] == "Siemens" and img.hdr_ext["EchoTime"] == pytest.approx(0.068)
    assert img.hdr_ext["ResonantNucleus"] == ["1H"]
    sidecar = json.loads(paths[1].with_name(paths[1].name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["profile"] == "megapress_siemens" and sidecar["seed"] == 5 and sidecar["vendor"] == "Siemens"
    batch = Simulator("megapress_siemens", GRID, device="cpu").simulate(3, seed=5)
    np.testing.assert_allclose(img[:][0, 0, 0].T, batch.fid[1].numpy(), atol=1e-7)
    assert sidecar["concentrations_mM"]["GABA"] == pytest.approx(float(batch.truth["GABA"][1]))
    for key in ("snr", "lorentzian_hz", "gaussian_hz", "shift_hz", "phase0_deg", "phase1_deg_per_ppm"):
        assert key in sidecar
    spec = load_spectrum(paths[1])  # the project's own reader agrees (sign, edit order, vendor)
    assert spec.sub == ("OFF", "ON") and spec.provenance.vendor == "Siemens"
    np.testing.assert_allclose(spec.fid, batch.fid[1].numpy(), atol=1e-6)

    press = dataclasses.replace(load_profile("press_ge"), n_transients=4)
    (path,) = write_simulated(press, 1, tmp_path / "press", seed=0, grid=GRID, device="cpu")
    img = NIFTI_MRS(str(path))
    assert img.shape == (1, 1, 1, GRID.points, 4) and img.dim_tags[0] == "DIM_DYN"
    assert abs(peak_ppm(load_spectrum(path), 1.8, 2.2) - 2.01) <= 0.1  # within the ±10 Hz shift range


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_statistics():
    """CUDA draws other random numbers than the CPU, so not the same spectra: the same distribution
    (mean magnitude per point and spread across spectra), and reproducible per seed on the GPU."""
    sim = Simulator("megapress_ge", GRID, device="cuda")
    out = sim.simulate(512, seed=0)
    assert out.fid.is_cuda and out.fid.shape == (512, 2, GRID.points)
    assert torch.equal(out.fid, sim.simulate(512, seed=0).fid)
    cpu = Simulator("megapress_ge", GRID, device="cpu").simulate(512, seed=0).fid
    gpu = out.fid.cpu()
    assert not cpu.is_cuda and torch.isfinite(gpu).all()
    mean_cpu, mean_gpu = cpu.abs().mean(0), gpu.abs().mean(0)
    assert (mean_gpu - mean_cpu).norm() / mean_cpu.norm() < 0.1
    ratio = gpu.abs().std(0).norm() / cpu.abs().std(0).norm()
    assert 0.8 < float(ratio) < 1.25, float(ratio)
