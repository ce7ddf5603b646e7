"""Training data: in vivo folder + simulated stream, deterministic in (seed, step)."""


import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import INVIVO

from mrsfm_model.config import load_config
from mrsfm_model.data.canonical import CanonicalGrid
from mrsfm_model.data.quality import QualityConfig
from mrsfm_model.data.spectrogram import SpectrogramConfig
from mrsfm_model.data.spectrum import select_channels
from mrsfm_model.data.stream import InputBuilder, InVivoSet, build_stream

CHANNELS = ["OFF", "ON", "DIFF"]


def test_select_channels_diff_is_on_minus_off_and_zero_when_unedited():
    fid = torch.randn(2, 2, 16, dtype=torch.complex64)
    edited = select_channels(fid, ("OFF", "ON"), CHANNELS)
    assert torch.equal(edited[:, 2], fid[:, 1] - fid[:, 0])
    plain = select_channels(fid[:, :1], ("avg",), CHANNELS)
    assert torch.equal(plain[:, 0], plain[:, 1]) and plain[:, 2].abs().max() == 0


@pytest.fixture(scope="module")
def invivo():
    return InVivoSet.from_folder(INVIVO, InputBuilder(CanonicalGrid.from_config(), SpectrogramConfig.from_config(), CHANNELS))


def test_invivo_folder_loads_every_real_file(invivo):
    vendors = sorted(s.provenance.vendor for s in invivo.spectra)
    # Philips PRESS (+ its water reference attached), Philips MM, Siemens RDA and IMA
    assert vendors == ["Philips", "Philips", "Siemens", "Siemens"]
    assert invivo.x.shape == (4, 3, 64, 32) and torch.isfinite(invivo.x).all()
    assert invivo.errors == []
    assert sorted(invivo.vendor.tolist()) == [1, 1, 2, 2]


def _stream(invivo, seed=0, batch=8, frac=0.25):
    cfg = load_config([f"data.batch_size={batch}", f"data.invivo_fraction={frac}",
                       "data.sim_profiles=[press_philips,megapress_ge]"])
    stream = build_stream(cfg.data, seed=seed)
    stream.invivo, stream.n_invivo, stream.n_sim = invivo, round(batch * frac), batch - round(batch * frac)
    return stream


def test_stream_is_deterministic_and_mixes_at_the_configured_ratio(invivo):
    a, b = _stream(invivo).batch(3), _stream(invivo).batch(3)
    assert torch.equal(a.x, b.x) and torch.equal(a.vendor, b.vendor)
    assert int(a.invivo.sum()) == 2 and a.x.shape == (8, 3, 64, 32)
    assert not torch.equal(_stream(invivo).batch(4).x, a.x)
    assert not torch.equal(_stream(invivo, seed=1).batch(3).x, a.x)
    sim_vendors = set(a.vendor[~a.invivo].tolist())
    assert sim_vendors == {0, 1}  # GE and Philips profiles both present in every batch


def test_every_invivo_spectrum_is_seen_once_per_epoch(invivo):
    stream = _stream(invivo, batch=4, frac=0.5)  # 2 in vivo per step, 4 spectra -> 2 steps per epoch
    seen = torch.cat([stream.invivo_batch(step).x for step in range(2)])
    match = [(seen[i] == invivo.x).flatten(1).all(1).nonzero().flatten().tolist() for i in range(4)]
    assert sorted(m[0] for m in match) == [0, 1, 2, 3]


def test_build_stream_reads_the_configured_folder():
    cfg = load_config([f"data.invivo_dir={INVIVO / 'siemens'}", "data.batch_size=4",
                       "data.sim_profiles=[press_siemens]"])
    stream = build_stream(cfg.data, seed=0)
    assert len(stream.invivo) == 2 and stream.n_invivo == 1
    assert stream.batch(0).x.shape == (4, 3, 64, 32)


def test_the_loader_leaves_out_noise_and_corrupt_files_with_the_reason(tmp_path):
    """Pure complex noise and an SDAT with 1 % of its bytes flipped load as spectra; the quality
    gate (data.quality.min_snr) keeps them out of training and says why, like a bad file."""
    from nifti_mrs.create_nmrs import gen_nifti_mrs

    for f in (INVIVO / "siemens").iterdir():
        shutil.copy(f, tmp_path / f.name)
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(2048) + 1j * rng.standard_normal(2048)).astype(np.complex64)
    gen_nifti_mrs(noise.reshape(1, 1, 1, -1), 1 / 2000.0, 127.7, nucleus="1H").save(str(tmp_path / "noise.nii.gz"))
    for f in (INVIVO / "philips").glob("sub-01_PRESS_35_act.*"):
        shutil.copy(f, tmp_path / f.name)
    sdat = tmp_path / "sub-01_PRESS_35_act.sdat"
    raw = bytearray(sdat.read_bytes())
    for i in rng.choice(len(raw), len(raw) // 100, replace=False):
        raw[i] ^= 0xFF
    sdat.write_bytes(bytes(raw))
    builder = InputBuilder(CanonicalGrid.from_config(), SpectrogramConfig.from_config(), CHANNELS)
    got = InVivoSet.from_folder(tmp_path, builder)
    assert sorted(s.provenance.vendor for s in got.spectra) == ["Siemens", "Siemens"]
    left_out = {Path(e.path).name: str(e) for e in got.errors}
    assert set(left_out) == {"noise.nii.gz", "sub-01_PRESS_35_act.sdat"}, left_out
    assert all("is below data.quality.min_snr 5" in why for why in left_out.values()), left_out
    everything = InVivoSet.from_folder(tmp_path, builder, QualityConfig.from_config(min_snr=None))
    assert len(everything) == 4  # the gate, not the reader, left them out
