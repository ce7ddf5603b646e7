"""The torch spectrogram equals the straightforward scipy recipe and lands peaks on the right rows."""

import numpy as np
import pytest
import torch

from mrsfm_model.data.canonical import CanonicalGrid
from mrsfm_model.data.spectrogram import (
    SpectrogramConfig,
    SpectrogramTransform,
    reference_spectrogram,
    spectrogram_axes,
)

GRID = CanonicalGrid.from_config()


def unit_cfg(**changes) -> SpectrogramConfig:
    """The configured spectrogram with pixels in [0, 1] (scale 1), which these tests reason about."""
    return SpectrogramConfig.from_config(**{"scale": 1.0, **changes})


def _fids(n, c, points=2048, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(points) / GRID.bandwidth_hz
    # decaying lines at random frequencies + noise: realistic dynamic range, not just noise
    f = rng.uniform(-540, -60, size=(n, c, 1))  # lines at 0.4-4.2 ppm, inside the default image
    fid = np.exp((2j * np.pi * f - 8.0) * t) + 0.05 * (rng.standard_normal((n, c, points)) + 1j * rng.standard_normal((n, c, points)))
    return fid.astype(np.complex64)


@pytest.mark.parametrize(
    "cfg",
    [
        unit_cfg(),
        unit_cfg(hop=16, height=160, width=128, norm="channel"),
        unit_cfg(height=224, width=224, part="abs"),  # Spectro-ViT's padded canvas
        unit_cfg(nperseg=128, hop=8, ppm_min=1.0, height=64, width=256, part="imag"),
        unit_cfg(scale=20.0),  # the config's default input scale
    ],
)
def test_torch_matches_scipy_recipe(cfg):
    fid = _fids(3, 3)
    ours = SpectrogramTransform(cfg, GRID)(torch.from_numpy(fid)).numpy()
    ref = np.stack([reference_spectrogram(x, cfg, GRID) for x in fid])
    assert ours.shape == (3, 3, cfg.height, cfg.width)
    assert np.abs(ours - ref).max() < 1e-5


def test_scale_multiplies_the_max_normalised_image():
    fid = torch.from_numpy(_fids(2, 3))
    plain = SpectrogramTransform(unit_cfg(), GRID)(fid)
    scaled = SpectrogramTransform(unit_cfg(scale=20.0), GRID)(fid)
    assert plain.amax().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(scaled, 20.0 * plain, atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        SpectrogramConfig.from_config({"scale": 0.0})


def test_default_size_is_the_metabolite_band_without_padding():
    cfg = unit_cfg()
    img = SpectrogramTransform(cfg, GRID)(torch.from_numpy(_fids(1, 1)))[0, 0]
    assert img.shape == (64, 32)
    ppm, t = spectrogram_axes(cfg, GRID)
    assert 0.2 <= np.nanmin(ppm) < 0.3 and 4.0 < np.nanmax(ppm) < 4.2 and not np.isnan(ppm).any()
    assert t[-1] == pytest.approx(0.155)  # the first 160 ms of the FID
    assert (img.abs().sum(0) > 0).all() and (img.abs().sum(1) > 0).all()  # content everywhere, no padding

    whole = unit_cfg(ppm_min=0.0, height=192, width=208)  # the recipe's plane stays available
    img = SpectrogramTransform(whole, GRID)(torch.from_numpy(_fids(1, 1)))[0, 0]
    assert img.shape == (192, 208) and (img.abs().sum(0) > 0).sum().item() == 206  # 2 padding columns


def test_peak_lands_on_its_ppm_row():
    cfg = unit_cfg(part="abs")
    t = np.arange(2048) / GRID.bandwidth_hz
    ppm_line = 2.01
    f = (ppm_line - 4.65) * GRID.spectrometer_mhz
    fid = np.exp((2j * np.pi * f - 5.0) * t).astype(np.complex64)
    img = SpectrogramTransform(cfg, GRID)(torch.from_numpy(fid)[None])[0]
    row = int(img[:, :20].sum(1).argmax())
    ppm, _ = spectrogram_axes(cfg, GRID)
    assert abs(ppm[row] - ppm_line) < 0.0612  # within one STFT bin (7.8 Hz)


def test_batched_equals_one_by_one_and_sample_norm_keeps_channel_ratio():
    fid = _fids(4, 3)
    fid[:, 2] *= 0.1  # a weak DIFF-like channel keeps its relative scale
    tr = SpectrogramTransform(unit_cfg(part="abs"), GRID)
    batch = tr(torch.from_numpy(fid))
    single = torch.stack([tr(torch.from_numpy(x)) for x in fid])
    assert torch.allclose(batch, single, atol=1e-6)
    assert batch[:, 2].amax() < 0.2 and batch[:, :2].amax() == pytest.approx(1.0)


def test_zero_channel_stays_zero_not_nan():
    fid = _fids(2, 3)
    fid[:, 2] = 0
    img = SpectrogramTransform(unit_cfg(norm="channel"), GRID)(torch.from_numpy(fid))
    assert torch.isfinite(img).all() and img[:, 2].abs().max() == 0


def test_rejects_real_input():
    with pytest.raises(TypeError):
        SpectrogramTransform()(torch.zeros(2, 2048))


def test_cpu_chunking_matches_the_reference():
    """Batches larger than the CPU chunk take the chunked path; it must not change a value."""
    fid = _fids(20, 3, seed=3)
    tr = SpectrogramTransform(unit_cfg(), GRID)
    assert 20 * 3 > tr.cpu_chunk
    ours = tr(torch.from_numpy(fid)).numpy()
    ref = np.stack([reference_spectrogram(x, tr.cfg, GRID) for x in fid])
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.parametrize("width", [32, 205, 206, 300])
def test_stft_over_kept_frames_equals_the_full_stft(width):
    """The transform reads only the samples its `width` frames use; the pixels are those of the
    STFT over every frame, cut afterwards (widths past the last frame are zero-padded alike)."""
    cfg = unit_cfg(width=width)
    fid = torch.from_numpy(_fids(4, 3, seed=5))
    ours = SpectrogramTransform(cfg, GRID)(fid)
    full = SpectrogramTransform(unit_cfg(width=400), GRID)(fid)  # 400 > the 206 frames there are
    full = full[..., :width] / full.amax(dim=(-3, -2, -1), keepdim=True)
    ours = ours / ours.amax(dim=(-3, -2, -1), keepdim=True)
    assert torch.equal(ours[..., : min(width, 206)] > 0, full[..., : min(width, 206)] > 0)
    assert (ours - full).abs().max() < 1e-6
