"""The one canonical signal grid that every FID, real or simulated, is moved onto.

Why: a vendor classifier (or an MAE) must not be able to tell sources apart by array length,
sampling rate, field strength or amplitude scale. Every source is therefore resampled onto
one ppm grid (points, bandwidth, spectrometer frequency), bands the source never measured
are filled with noise of the source's own level, and amplitudes are normalised.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .spectrum import PPM_REFERENCE, Spectrum, ppm_axis


@dataclass(frozen=True)
class CanonicalGrid:
    """Target sampling: defaults follow Big GABA / Spectro-ViT (2048 points, 2 kHz, 3 T)."""

    points: int = 2048
    bandwidth_hz: float = 2000.0
    spectrometer_mhz: float = 127.7
    norm_ppm: tuple[float, float] = (1.8, 4.0)  # amplitude reference window (NAA..Cr/Cho)
    fill_noise: bool = True  # fill unmeasured bands with noise instead of a telltale zero

    @property
    def duration_s(self) -> float:
        return self.points / self.bandwidth_hz

    def ppm(self) -> np.ndarray:
        return ppm_axis(self.points, self.bandwidth_hz, self.spectrometer_mhz)

    @classmethod
    def from_config(cls, cfg) -> "CanonicalGrid":
        """Build from a mapping (Hydra node or dict) with any subset of the fields."""
        keys = {k: cfg[k] for k in ("points", "bandwidth_hz", "spectrometer_mhz", "fill_noise") if k in cfg}
        if "norm_ppm" in cfg:
            keys["norm_ppm"] = tuple(float(x) for x in cfg["norm_ppm"])
        return cls(**keys)


def _noise_std(spec: np.ndarray, edge_fraction: float = 0.05) -> float:
    """Robust complex noise level from the outermost bins, where no metabolite lives."""
    n = spec.shape[-1]
    k = max(8, int(n * edge_fraction))
    edges = np.concatenate([spec[..., :k].ravel(), spec[..., -k:].ravel()])
    mad = np.median(np.abs(edges.real - np.median(edges.real)))
    return float(1.4826 * mad)


def resample_fids(
    fids: np.ndarray,
    bandwidth_hz: float,
    spectrometer_mhz: float,
    grid: CanonicalGrid,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Resample complex FIDs (..., points) onto the grid's ppm axis.

    The FID is cut to the grid's duration (so sampling the spectrum cannot wrap its tail),
    zero-filled until its spectrum is at least twice as fine as the target, and its real and
    imaginary spectra are interpolated onto the target ppm axis. Scale is left to `normalise`.
    """
    fids = np.asarray(fids)
    n_src = fids.shape[-1]
    keep = min(n_src, max(1, int(round(grid.duration_s * bandwidth_hz))))
    fids = fids[..., :keep]
    target_res_ppm = grid.bandwidth_hz / grid.points / grid.spectrometer_mhz
    src_span_ppm = bandwidth_hz / spectrometer_mhz
    n_fine = int(2 ** np.ceil(np.log2(max(keep, 2.0 * src_span_ppm / target_res_ppm))))
    src = np.fft.fftshift(np.fft.fft(fids, n=n_fine, axis=-1), axes=-1)
    src_ppm = ppm_axis(n_fine, bandwidth_hz, spectrometer_mhz)
    dst_ppm = grid.ppm()
    flat = src.reshape(-1, n_fine)
    out = np.empty((flat.shape[0], grid.points), dtype=np.complex128)
    for i, row in enumerate(flat):
        out[i] = np.interp(dst_ppm, src_ppm, row.real, left=0, right=0) + 1j * np.interp(
            dst_ppm, src_ppm, row.imag, left=0, right=0
        )
    outside = (dst_ppm < src_ppm[0]) | (dst_ppm > src_ppm[-1])
    if grid.fill_noise and outside.any():
        rng = rng or np.random.default_rng(0)
        sigma = _noise_std(flat)
        out[:, outside] = sigma * (
            rng.standard_normal((out.shape[0], int(outside.sum())))
            + 1j * rng.standard_normal((out.shape[0], int(outside.sum())))
        ) / np.sqrt(2.0)
    # back to time domain; scale so a peak's height per Hz is independent of the source grid
    fid = np.fft.ifft(np.fft.ifftshift(out, axes=-1), axis=-1) * (grid.points / n_fine)
    return fid.reshape(*fids.shape[:-1], grid.points).astype(np.complex64)


def norm_factor(fid: np.ndarray, grid: CanonicalGrid) -> float:
    """max |spectrum| inside the grid's reference window of one canonical FID (row)."""
    spec = np.abs(np.fft.fftshift(np.fft.fft(fid, axis=-1), axes=-1))
    ppm = grid.ppm()
    lo, hi = grid.norm_ppm
    m = (ppm >= lo) & (ppm <= hi)
    return float(spec[..., m].max())


def to_canonical(spec: Spectrum, grid: CanonicalGrid, normalise: bool = True, seed: int = 0) -> Spectrum:
    """Move a spectrum (all rows, transients and water reference) onto the canonical grid.

    Amplitudes are divided by one factor (from the first row: OFF or the average), so edit-ON,
    edit-OFF and transients keep their relative scale.
    """
    rng = np.random.default_rng(seed)
    same = (
        spec.points == grid.points
        and np.isclose(spec.bandwidth_hz, grid.bandwidth_hz)
        and np.isclose(spec.spectrometer_mhz, grid.spectrometer_mhz)
    )

    def move(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        if same:
            return np.asarray(x, dtype=np.complex64)
        return resample_fids(x, spec.bandwidth_hz, spec.spectrometer_mhz, grid, rng)

    fid, trans, ref = move(spec.fid), move(spec.transients), move(spec.reference)
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
