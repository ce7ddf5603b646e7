"""The in-memory record every source (vendor file, NIfTI-MRS, simulation) turns into.

A `Spectrum` holds complex FIDs as rows (one row per sub-spectrum: the average for unedited
data, edit-OFF / edit-ON for MEGA-PRESS) plus the provenance a downstream task may need.
The FID sign convention is NIfTI-MRS': spectrum = fftshift(fft(fid)), ppm rising with index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

VENDORS = ("GE", "Philips", "Siemens")
GAMMA_1H_MHZ_PER_T = 42.577  # 1H gyromagnetic ratio / 2 pi
PPM_REFERENCE = 4.65  # water, the receiver reference used by every reader here


def normalise_vendor(name: str | None) -> str | None:
    """Map the many header spellings ("SIEMENS", "Philips Medical Systems", "GE MEDICAL") to one."""
    if not name:
        return None
    low = str(name).strip().lower()
    if "siemens" in low:
        return "Siemens"
    if "philips" in low:
        return "Philips"
    if low.startswith("ge") or "general electric" in low or "ge medical" in low or "gehc" in low:
        return "GE"
    return None


@dataclass
class Provenance:
    """Where a spectrum came from; travels with it into datasets and model cards."""

    source: str
    vendor: str | None = None
    field_t: float | None = None
    spectrometer_mhz: float | None = None
    bandwidth_hz: float | None = None
    points: int | None = None
    te_ms: float | None = None
    tr_ms: float | None = None
    dims: list[str] = field(default_factory=list)
    sequence: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(d.pop("extra"))
        return d


@dataclass
class Spectrum:
    """Complex FIDs (rows = sub-spectra, columns = time points) on one sampling grid.

    `sub` names the rows: ("avg",) for unedited data, ("OFF", "ON") for edited data.
    `transients` optionally keeps individual transients, shape (n_transients, n_sub, points).
    """

    fid: np.ndarray
    bandwidth_hz: float
    spectrometer_mhz: float
    sub: tuple[str, ...]
    provenance: Provenance
    transients: np.ndarray | None = None
    reference: np.ndarray | None = None  # water reference FID (points,), same grid, if known

    def __post_init__(self) -> None:
        self.fid = np.atleast_2d(np.asarray(self.fid))
        if self.fid.shape[0] != len(self.sub):
            raise ValueError(f"fid has {self.fid.shape[0]} rows but sub names {self.sub}")

    @property
    def points(self) -> int:
        return int(self.fid.shape[-1])

    @property
    def dwell_s(self) -> float:
        return 1.0 / self.bandwidth_hz

    @property
    def edited(self) -> bool:
        return "ON" in self.sub and "OFF" in self.sub

    def ppm_axis(self) -> np.ndarray:
        """ppm of each bin of fftshift(fft(fid)), rising with index."""
        return ppm_axis(self.points, self.bandwidth_hz, self.spectrometer_mhz)

    def spectrum(self) -> np.ndarray:
        return np.fft.fftshift(np.fft.fft(self.fid, axis=-1), axes=-1)

    def row(self, name: str) -> np.ndarray:
        """One sub-spectrum FID by name (OFF, ON, DIFF = ON - OFF, avg); unedited data have
        ON = OFF = the average and DIFF = 0. Defined once, in `select_channels`."""
        fid = torch.from_numpy(np.ascontiguousarray(self.fid))
        return select_channels(fid, self.sub, [name])[0].numpy()

    def with_fid(self, fid: np.ndarray, **changes: Any) -> Spectrum:
        return replace(self, fid=fid, **changes)


def select_channels(fid: torch.Tensor, sub: Sequence[str], channels: Sequence[str]) -> torch.Tensor:
    """(..., n_sub, points) rows named `sub` -> (..., C, points) in `channels` order.

    OFF/ON of unedited data ("avg") are the average itself and DIFF is ON - OFF, so unedited
    spectra get DIFF = 0 from the definition rather than from a special case.
    """
    sub = tuple(sub)

    def row(name: str) -> torch.Tensor:
        if name in sub:
            return fid[..., sub.index(name), :]
        if name == "DIFF":
            return row("ON") - row("OFF")
        if name in ("ON", "OFF") and sub == ("avg",):
            return fid[..., 0, :]
        if name == "avg":
            return fid.mean(dim=-2)
        raise KeyError(f"no sub-spectrum {name!r} among {sub}")

    return torch.stack([row(c) for c in channels], dim=-2)


def ppm_axis(points: int, bandwidth_hz: float, spectrometer_mhz: float) -> np.ndarray:
    freq = np.fft.fftshift(np.fft.fftfreq(points, d=1.0 / bandwidth_hz))
    return PPM_REFERENCE + freq / spectrometer_mhz


def peak_ppm(spec: Spectrum, lo: float = 1.8, hi: float = 2.2, row: str | None = None) -> float:
    """ppm of the tallest peak (magnitude, so phase errors do not move it) between lo and hi."""
    fid = spec.row(row) if row else spec.fid[0]
    s = np.abs(np.fft.fftshift(np.fft.fft(fid)))
    ppm = spec.ppm_axis()
    m = (ppm >= lo) & (ppm <= hi)
    if not m.any():
        raise ValueError(f"the spectrum does not cover {lo}-{hi} ppm")
    return float(ppm[m][np.argmax(s[m])])
