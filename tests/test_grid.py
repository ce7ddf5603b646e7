"""Canonical grid: positions survive resampling, and length, bandwidth, field and scale vanish."""

import numpy as np
import pytest

from mrsfm_model.data.canonical import CanonicalGrid, to_canonical
from mrsfm_model.data.spectrum import Provenance, Spectrum, peak_ppm
from mrsfm_model.data.water import remove_water

GRID = CanonicalGrid.from_config(remove_water=False)


def _synthetic(points, bw, mhz, lines=((2.01, 1.0), (3.02, 0.8), (3.22, 0.6)), noise=0.002, water=0.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(points) / bw
    fid = sum(a * np.exp((2j * np.pi * (ppm - 4.65) * mhz - np.pi * 6.0) * t) for ppm, a in lines)
    if water:
        fid = fid + water * np.exp((2j * np.pi * 0.02 * mhz - np.pi * 10.0) * t)
    fid = fid + noise * (rng.standard_normal(points) + 1j * rng.standard_normal(points))
    return Spectrum(fid[None].astype(np.complex64), bw, mhz, ("avg",), Provenance("synthetic"))


@pytest.mark.parametrize("points,bw,mhz", [(1024, 1200.0, 123.2), (2048, 2000.0, 127.75), (4096, 4000.0, 297.2),
                                           (4096, 12004.8, 297.2), (512, 1000.0, 63.8)])
def test_peaks_keep_their_ppm(points, bw, mhz):
    canon = to_canonical(_synthetic(points, bw, mhz), GRID)
    assert canon.fid.shape == (1, 2048)
    assert peak_ppm(canon) == pytest.approx(2.01, abs=0.02)
    assert peak_ppm(canon, 2.9, 3.1) == pytest.approx(3.02, abs=0.02)


def test_scale_is_normalised_away():
    a = to_canonical(_synthetic(1024, 1200.0, 123.2), GRID)
    b_src = _synthetic(1024, 1200.0, 123.2)
    b = to_canonical(b_src.with_fid(b_src.fid * 1e5), GRID)
    assert np.allclose(a.fid, b.fid, atol=1e-6)
    spec = np.abs(np.fft.fft(a.fid[0]))
    ppm = np.fft.fftfreq(2048, 1 / 2000.0) / 127.7 + 4.65
    assert spec[(ppm > 1.8) & (ppm < 4.0)].max() == pytest.approx(1.0, rel=1e-5)


def test_short_acquisition_leaves_no_silent_tail():
    """A 0.85 s Siemens-like FID must not end in zeros on the 1.02 s grid (a vendor giveaway)."""
    canon = to_canonical(_synthetic(1024, 1200.0, 123.2, noise=0.01), GRID).fid[0]
    mid, tail = np.std(canon[1000:1500]), np.std(canon[1800:])
    assert 0.6 < tail / mid < 1.6


def test_narrow_band_is_filled_like_the_measured_band():
    """Bands a 1.2 kHz acquisition never measured get noise of the measured band's level."""
    canon = to_canonical(_synthetic(1024, 1200.0, 123.2, noise=0.01), GRID)
    spec = np.fft.fftshift(np.fft.fft(canon.fid[0]))
    ppm = GRID.ppm()
    filled = spec[ppm > 10.5]
    measured = spec[(ppm > 7.5) & (ppm < 9.0)]
    assert 0.6 < np.std(filled.real) / np.std(measured.real) < 1.6
    assert abs(np.mean(filled.real) - np.mean(measured.real)) < 3 * np.std(measured.real)


def test_water_removal_keeps_metabolites():
    src = _synthetic(2048, 2000.0, 127.75, water=50.0)
    cleaned = src.with_fid(remove_water(src.fid, src.bandwidth_hz, src.spectrometer_mhz))
    spec = lambda s: np.abs(np.fft.fftshift(np.fft.fft(s.fid[0])))  # noqa: E731
    ppm = src.ppm_axis()
    water, naa = (ppm > 4.5) & (ppm < 4.8), (ppm > 1.9) & (ppm < 2.1)
    assert spec(src)[water].max() > 20 * spec(src)[naa].max()
    assert spec(cleaned)[water].max() < 0.2 * spec(cleaned)[naa].max()
    assert spec(cleaned)[naa].max() == pytest.approx(spec(_synthetic(2048, 2000.0, 127.75))[naa].max(), rel=0.05)


def test_edited_rows_share_one_scale():
    s = _synthetic(2048, 2000.0, 127.75)
    on = s.fid[0] * 0.5
    edited = Spectrum(np.stack([s.fid[0], on]), 2000.0, 127.75, ("OFF", "ON"), Provenance("x"))
    canon = to_canonical(edited, GRID)
    ratio = np.abs(canon.fid[1]).max() / np.abs(canon.fid[0]).max()
    assert ratio == pytest.approx(0.5, rel=0.05)


def test_water_removal_lets_other_threads_run():
    """A site worker loads its spectra while a thread sends Flower's task heartbeat: the SVD must not
    hold the GIL for the whole call (scipy's did, and a loaded machine let the task token expire)."""
    import threading
    import time

    from mrsfm_model.data.water import hlsvd

    src = _synthetic(4096, 4000.0, 297.2, water=50.0)
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.005)

    side = threading.Thread(target=tick)
    side.start()
    t0 = time.perf_counter()
    hlsvd(src.fid[0], 1 / src.bandwidth_hz, points=2048)  # a 1024 x 1025 Hankel matrix
    t1 = time.perf_counter()
    stop.set()
    side.join()
    inside = [t for t in ticks if t0 <= t <= t1]
    gaps = np.diff([t0, *inside, t1])
    assert len(inside) > 3 and gaps.max() < 0.5 * (t1 - t0), (gaps.max(), t1 - t0)
