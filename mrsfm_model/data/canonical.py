"""The one canonical signal grid that every FID, real or simulated, is moved onto.

Why: a vendor classifier (or an MAE) must not be able to tell sources apart by array length,
sampling rate, field strength or amplitude scale. Every source is therefore resampled onto
one ppm grid (points, bandwidth, spectrometer frequency), bands the source never measured
are filled with noise of the source's own level, and amplitudes are normalised.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mrsfm_model.config import ConfigSection
from mrsfm_model.data.spectrum import PPM_REFERENCE, Spectrum, ppm_axis
from mrsfm_model.data.water import remove_water


@dataclass(frozen=True)
class CanonicalGrid(ConfigSection):
    """Target sampling (configs/data/default.yaml `grid`: Big GABA / Spectro-ViT, 2048 points, 2 kHz, 3 T)."""

    SECTION = "data.grid"
    points: int
    bandwidth_hz: float
    spectrometer_mhz: float
    norm_ppm: tuple[float, float]  # amplitude reference window (NAA..Cr/Cho)
    fill_noise: bool  # fill unmeasured bands with noise instead of a telltale zero
    remove_water: bool  # HLSVD residual-water removal of loaded spectra (water.py)
    water_ppm: tuple[float, float]
    tail_trim: float  # fraction of each source FID's end replaced by noise (with fill_noise)
    band_trim: float  # fraction of the source band at each edge replaced by noise (likewise)

    @property
    def duration_s(self) -> float:
        return self.points / self.bandwidth_hz

    def ppm(self) -> np.ndarray:
        return ppm_axis(self.points, self.bandwidth_hz, self.spectrometer_mhz)


def _cnoise(rng: np.random.Generator, sigma: float, shape) -> np.ndarray:
    return sigma * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2.0)


def _robust_sigma(x: np.ndarray) -> float:
    """Complex noise level from the real part's median absolute deviation."""
    return float(1.4826 * np.median(np.abs(x.real - np.median(x.real))) * np.sqrt(2.0))


def _fill_band(spec: np.ndarray, band: np.ndarray, rng: np.random.Generator) -> None:
    """Raise the noise of the unmeasured bins outside `band` to the measured band's level.

    The level is the median over 16 slices of the measured band, so neither metabolite peaks
    nor a scanner's filter edge inflate it. Additive noise only: the broadband start of the
    FID already present there is kept, and no level step is added (replacing bins or shifting
    their level rings at t = 0, which wraps to the end of the FID and would mark the source).
    """
    inside = np.flatnonzero(band)
    sigma = float(np.median([_robust_sigma(spec[c]) for c in np.array_split(inside, 16)]))
    for side in (np.arange(len(spec)) < inside[0], np.arange(len(spec)) > inside[-1]):
        if side.any():
            cur = spec[side]
            extra = np.sqrt(max(sigma**2 - _robust_sigma(cur) ** 2, 0.0))
            spec[side] = cur + _cnoise(rng, extra, int(side.sum()))


def resample_fids(
    fids: np.ndarray,
    bandwidth_hz: float,
    spectrometer_mhz: float,
    grid: CanonicalGrid,
    rng: np.random.Generator | None = None,
    oversample: int = 8,
) -> np.ndarray:
    """Resample complex FIDs (..., points) onto the grid, in the time domain.

    Time is measured in ppm units (t * MHz), so sources at other fields land on the same ppm
    axis (only their linewidths differ). The source is low-passed to the grid's ppm band,
    band-limited-upsampled by FFT zero-padding and read at the grid's sample times. With
    `fill_noise`, what the source never measured looks like what it did: time after its
    acquisition ended gets noise of its own tail, and bands outside its bandwidth get its
    noise level, so neither an acquisition length nor a band edge is visible.
    Scale is left to `norm_factor`.
    """
    fids = np.asarray(fids)
    rng = rng or np.random.default_rng(0)
    n = fids.shape[-1]
    # source time (s) of each canonical sample, and how much of the grid the source covers
    t_src = np.arange(grid.points) / grid.bandwidth_hz * grid.spectrometer_mhz / spectrometer_mhz
    pos = t_src * bandwidth_hz * oversample  # index into the upsampled source
    # the last few percent of a FID are noise in any sane acquisition but carry scanner
    # artefacts in some (Siemens digital-filter wrap-around): treat them as unmeasured
    usable = max(2, int(np.ceil(n * (1 - grid.tail_trim)))) if grid.fill_noise else n
    covered = pos <= (usable - 1) * oversample
    n_pad = 2 * n  # zeros after the FID, so upsampling does not wrap its end onto its start
    src_ppm = ppm_axis(n_pad, bandwidth_hz, spectrometer_mhz)
    # likewise the outer edges of the source band (anti-aliasing filter roll-off, edge spurs)
    edge = grid.band_trim * (src_ppm[-1] - src_ppm[0]) if grid.fill_noise else 0.0
    src_lo, src_hi = src_ppm[0] + edge, src_ppm[-1] - edge
    dst_ppm = grid.ppm()
    keep_bins = np.fft.ifftshift((src_ppm >= max(src_lo, dst_ppm[0])) & (src_ppm <= min(src_hi, dst_ppm[-1])))
    in_band = (dst_ppm >= src_lo) & (dst_ppm <= src_hi)
    flat = fids.reshape(-1, n)
    out = np.empty((flat.shape[0], grid.points), dtype=np.complex128)
    for i, row in enumerate(flat):
        spec = np.fft.fft(row, n_pad) * keep_bins
        up = np.zeros(n_pad * oversample, dtype=np.complex128)
        half = n_pad // 2
        up[:half], up[len(up) - (n_pad - half):] = spec[:half], spec[half:]
        fine = np.fft.ifft(up) * oversample
        fid = np.zeros(grid.points, dtype=np.complex128)
        grid_idx = np.arange(len(fine))
        fid[covered] = np.interp(pos[covered], grid_idx, fine.real) + 1j * np.interp(pos[covered], grid_idx, fine.imag)
        if grid.fill_noise:
            last = np.flatnonzero(covered)[-1] + 1
            if last < grid.points:
                tail = fid[int(0.5 * last) : int(0.8 * last)]  # late, but clear of end effects
                fid[last:] = _cnoise(rng, _robust_sigma(tail), grid.points - last)
            if not in_band.all():
                shifted = np.fft.fftshift(np.fft.fft(fid))
                _fill_band(shifted, in_band, rng)
                fid = np.fft.ifft(np.fft.ifftshift(shifted))
        out[i] = fid
    return out.reshape(*fids.shape[:-1], grid.points).astype(np.complex64)


def norm_factor(fid: np.ndarray, grid: CanonicalGrid) -> float:
    """max |spectrum| inside the grid's reference window of one canonical FID (row)."""
    spec = np.abs(np.fft.fftshift(np.fft.fft(fid, axis=-1), axes=-1))
    ppm = grid.ppm()
    lo, hi = grid.norm_ppm
    m = (ppm >= lo) & (ppm <= hi)
    return float(spec[..., m].max())


def to_canonical(spec: Spectrum, grid: CanonicalGrid, normalise: bool = True, seed: int = 0) -> Spectrum:
    """Move a spectrum (all rows, transients and water reference) onto the canonical grid.

    Residual water is removed first (grid.remove_water) on the source grid, where HLSVD sees
    the FID as measured. Amplitudes are divided by one factor (from the first row: OFF or the average), so edit-ON,
    edit-OFF and transients keep their relative scale.
    """
    rng = np.random.default_rng(seed)
    same = (
        spec.points == grid.points
        and np.isclose(spec.bandwidth_hz, grid.bandwidth_hz)
        and np.isclose(spec.spectrometer_mhz, grid.spectrometer_mhz)
    )

    def move(x: np.ndarray | None, water: bool = True) -> np.ndarray | None:
        if x is None:
            return None
        if water and grid.remove_water:
            x = remove_water(x, spec.bandwidth_hz, spec.spectrometer_mhz, grid.water_ppm)
        if same:
            return np.asarray(x, dtype=np.complex64)
        return resample_fids(x, spec.bandwidth_hz, spec.spectrometer_mhz, grid, rng)

    fid, trans, ref = move(spec.fid), move(spec.transients), move(spec.reference, water=False)
    if normalise:
        scale = norm_factor(fid[0], grid)
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError("the spectrum is empty (zero signal) in the reference window")
        fid = fid / scale
        trans = None if trans is None else trans / scale
        ref = None if ref is None else ref / scale
    return replace(
        spec,
        fid=fid.astype(np.complex64),
        transients=trans,
        reference=ref,
        bandwidth_hz=grid.bandwidth_hz,
        spectrometer_mhz=grid.spectrometer_mhz,
    )


__all__ = ["CanonicalGrid", "resample_fids", "to_canonical", "norm_factor", "PPM_REFERENCE"]
