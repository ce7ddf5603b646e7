"""In vivo-like spectra simulated in batches with torch, on the model's device, from a vendor profile.

Why: pretraining needs an endless, labelled, vendor-specific stream that never starves the GPU.
A profile (`configs/simulation/<name>.yaml`) names a basis set (which carries the vendor's
editing and refocusing pulses) and the ranges of every nuisance parameter. The signal model is
the one used by FSL-MRS / LCModel-style fitting:

    FID(t) = [sum_m c_m B_m(t) + sum_k a_k MM_k(t)] * exp(-pi L t - (pi G t)^2 / (4 ln 2))
             * exp(i 2 pi shift t) + residual water
    S(ppm) = (FFT(FID) + noise) * exp(i (phi0 + phi1 (ppm - 4.65))) + baseline(ppm)

Units and definitions (also what the ground truth holds):
- concentrations in mM on the basis scale of `basis.py` (1 mM Cr: unit-height singlet at 6 Hz);
- lorentzian_hz / gaussian_hz: added Lorentzian / Gaussian full widths at half maximum (Hz);
- shift_hz: frequency shift of all metabolites; phase0 (deg), phase1 (deg per ppm, pivot 4.65);
- snr: height of the tallest real peak of the noise-free, unphased metabolite + MM spectrum
  of the first row (OFF or the average) inside grid.norm_ppm, divided by the standard
  deviation of the real part of the spectral noise (of the averaged spectrum);
- water, baseline: residual water peak height and baseline size, relative to that peak;
- norm_scale: the divisor that gave the first row a max |spectrum| of 1 in grid.norm_ppm.
MEGA-PRESS basis sets give rows ("OFF", "ON"); unedited ones ("avg",). When a basis set has
no macromolecules, Gaussian MM and lipid peaks at standard positions are used instead.

Reproducibility: a batch is a pure function of (profile, grid, n, seed, device type); CPU and
CUDA random streams differ, so the same seed gives different (equally valid) samples on each.
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrsfm_model.config import RESOURCES, config_dir, read_composed
from mrsfm_model.data.basis import UNIT_FWHM_HZ, Basis, load_basis
from mrsfm_model.data.canonical import CanonicalGrid
from mrsfm_model.data.spectrum import GAMMA_1H_MHZ_PER_T, PPM_REFERENCE, Provenance, Spectrum

BASIS_DIR = RESOURCES / "basis"

# Parametric macromolecules and lipids (ppm, FWHM ppm, protons), after the LCModel manual's
# defaults and Osprey's MM basis; used only when the basis set has none of its own.
MM_PEAKS: dict[str, tuple[float, float, float]] = {
    "MM09": (0.91, 0.14, 3.0), "MM12": (1.21, 0.15, 2.0), "MM14": (1.43, 0.17, 2.0),
    "MM17": (1.67, 0.15, 2.0), "MM20": (2.05, 0.20, 2.5), "MM22": (2.25, 0.15, 1.0),
    "MM30": (3.00, 0.20, 1.0), "MM32": (3.20, 0.15, 1.0), "MM39": (3.90, 0.20, 1.5),
    "Lip09": (0.89, 0.14, 3.0), "Lip13": (1.28, 0.15, 4.0), "Lip20": (2.04, 0.15, 2.9),
}
MM_COEDITED = ("MM3co", (3.00, 0.13, 2.0))  # GABA+ co-edited MM: edit-ON only

Range = tuple[float, float]


# --------------------------------------------------------------------------- profiles
@dataclass
class SimProfile:
    """One vendor/sequence simulation recipe; ranges are uniform [lo, hi]."""

    name: str
    basis: str  # relative to mrsfm_model/resources/basis (or absolute)
    vendor: str | None  # None: the basis set's own vendor
    sequence: str | None  # None: the basis set's own sequence
    concentrations: dict[str, Range]  # mM; absent in basis: ignored
    other_concentration: Range  # mM, basis metabolites not listed above
    exclude: list[str]  # basis metabolites never simulated
    lorentzian_hz: Range
    gaussian_hz: Range
    shift_hz: Range
    phase0_deg: Range
    phase1_deg_per_ppm: Range
    baseline_amplitude: Range
    baseline_order: int
    mm_scale: Range
    lipid_scale: Range
    mm_jitter: float  # per-component relative spread around the sample's MM scale
    water_amplitude: Range
    water_width_hz: Range
    water_offset_hz: Range
    snr: Range
    n_transients: int
    drift_hz_per_transient: Range
    freq_jitter_hz: float  # std of per-transient frequency error
    phase_jitter_deg: float  # std of per-transient phase error

    def basis_path(self) -> Path:
        p = Path(self.basis)
        return p if p.is_absolute() else BASIS_DIR / p

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SimProfile:
        """Every key from the profile's YAML (its defaults list supplies the shared ones)."""
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(d) - known), sorted(known - set(d))
        if unknown or missing:
            raise ValueError(f"simulation profile {d.get('name', '?')}: "
                             + "; ".join(f"{what} keys {keys}" for what, keys in (("unknown", unknown),
                                                                                  ("missing", missing)) if keys))
        kw = dict(d)
        hints = typing.get_type_hints(cls)
        for name in known:
            if hints[name] == Range:
                kw[name] = _range(kw[name], name)
        kw["concentrations"] = {m: _range(r, m) for m, r in dict(kw["concentrations"] or {}).items()}
        kw["exclude"] = list(kw["exclude"] or [])
        return cls(**kw)


def _range(value: Any, name: str) -> Range:
    lo, hi = (float(v) for v in (value if isinstance(value, (list, tuple)) else (value, value)))
    if hi < lo:
        raise ValueError(f"range {name}: {lo} > {hi}")
    return lo, hi


def profile_dir() -> Path:
    """configs/simulation: one YAML per profile, `_common.yaml` holds what they share."""
    return config_dir() / "simulation"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in profile_dir().glob("*.yaml") if not p.stem.startswith("_"))


def load_profile(name_or_path: str | Path) -> SimProfile:
    """A profile by name (`configs/simulation/<name>.yaml`) or by YAML path."""
    p = Path(name_or_path)
    path = p if p.suffix in (".yaml", ".yml") else profile_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"simulation profile {name_or_path!r} not found; "
                                f"available: {', '.join(available_profiles())}")
    d = read_composed(path)
    d.setdefault("name", path.stem)
    return SimProfile.from_dict(d)


# --------------------------------------------------------------------------- batches
@dataclass
class SimBatch:
    """n simulated spectra on the canonical grid, with their ground truth (each (n,) tensor)."""

    fid: torch.Tensor  # complex (n, n_sub, points)
    truth: dict[str, torch.Tensor]
    sub: tuple[str, ...]
    vendor: str | None
    profile: str
    seed: int
    grid: CanonicalGrid
    metabolites: list[str]
    sequence: str
    te_ms: float | None
    transients: torch.Tensor | None = None  # complex (n, n_transients, n_sub, points)

    def __len__(self) -> int:
        return int(self.fid.shape[0])

    @property
    def concentrations(self) -> dict[str, torch.Tensor]:
        return {m: self.truth[m] for m in self.metabolites}

    def truth_row(self, i: int) -> dict[str, float]:
        return {k: float(v[i]) for k, v in self.truth.items()}

    def to_spectra(self) -> list[Spectrum]:
        """One `Spectrum` per sample; ground truth as plain floats in provenance.extra["truth"]."""
        fid = self.fid.detach().cpu().numpy().astype(np.complex64)
        trans = None if self.transients is None else self.transients.detach().cpu().numpy().astype(np.complex64)
        truth = {k: v.detach().cpu().double().numpy() for k, v in self.truth.items()}
        g = self.grid
        dims = (["DIM_DYN"] if trans is not None else []) + (["DIM_EDIT"] if "ON" in self.sub else [])
        out = []
        for i in range(len(self)):
            prov = Provenance(
                source=f"simulated:{self.profile}:{self.seed}:{i}", vendor=self.vendor,
                field_t=g.spectrometer_mhz / GAMMA_1H_MHZ_PER_T, spectrometer_mhz=g.spectrometer_mhz,
                bandwidth_hz=g.bandwidth_hz, points=g.points, te_ms=self.te_ms, dims=dims,
                sequence=self.sequence,
                extra={"truth": {k: float(v[i]) for k, v in truth.items()}, "profile": self.profile},
            )
            out.append(Spectrum(fid=fid[i], bandwidth_hz=g.bandwidth_hz, spectrometer_mhz=g.spectrometer_mhz,
                                sub=self.sub, provenance=prov, transients=None if trans is None else trans[i]))
        return out


# --------------------------------------------------------------------------- simulator
def parametric_mm(grid: CanonicalGrid, sub: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Gaussian MM/lipid FIDs (names, (K, n_sub, points)) on the basis amplitude scale.

    A peak of p protons has the area of p/3 mM of Cr's CH3 singlet; the co-edited 3.0 ppm MM
    appears in edit-ON only.
    """
    t = np.arange(grid.points) / grid.bandwidth_hz
    unit_area = 1.0645 * UNIT_FWHM_HZ / (grid.bandwidth_hz / grid.points)
    peaks = dict(MM_PEAKS)
    if "ON" in sub:
        peaks[MM_COEDITED[0]] = MM_COEDITED[1]
    rows = []
    for name, (ppm, fwhm_ppm, protons) in peaks.items():
        f, w = (ppm - PPM_REFERENCE) * grid.spectrometer_mhz, fwhm_ppm * grid.spectrometer_mhz
        fid = protons / 3 * unit_area / grid.points * np.exp(2j * np.pi * f * t - (np.pi * w * t) ** 2 / (4 * np.log(2)))
        rows.append([fid * (name != MM_COEDITED[0] or s == "ON") for s in sub])
    return list(peaks), np.asarray(rows, dtype=np.complex64)


def _real_bank(x: np.ndarray, device, dtype) -> torch.Tensor:
    """(K, n_sub, points) complex -> (K, n_sub*points*2) real, so mixing is one real matmul."""
    t = torch.view_as_real(torch.from_numpy(np.ascontiguousarray(x, dtype=np.complex64)))
    return t.reshape(x.shape[0], -1).to(device=device, dtype=dtype)


class Simulator:
    """Batched spectra for one profile on one device; the basis set is loaded once."""

    def __init__(self, profile: SimProfile | str, grid: CanonicalGrid | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.profile = load_profile(profile) if isinstance(profile, (str, Path)) else profile
        self.grid = grid or CanonicalGrid.from_config()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.basis: Basis = load_basis(self.profile.basis_path(), self.grid)
        p, b, g = self.profile, self.basis, self.grid
        self.sub = b.sub
        self.vendor = p.vendor if p.vendor is not None else b.vendor
        self.sequence = p.sequence or b.sequence
        self.metabolites = [m for m in b.metabolites if m not in p.exclude]
        ranges = [p.concentrations.get(m, p.other_concentration) for m in self.metabolites]
        self._lo, self._hi = (torch.tensor(r, dtype=dtype, device=self.device) for r in zip(*ranges))
        if b.macromolecules:
            self.mm_names, mm = b.macromolecules, b.stack(b.macromolecules)
        else:
            self.mm_names, mm = parametric_mm(g, self.sub)
        self._lipid = torch.tensor([n.startswith("Lip") for n in self.mm_names], device=self.device)
        self._bank = _real_bank(np.concatenate([b.stack(self.metabolites), mm]), self.device, dtype)
        self._t = torch.arange(g.points, device=self.device, dtype=dtype) / g.bandwidth_hz
        # Spectra stay in FFT order (no fftshift copies): per-bin vectors are stored in that order.
        self._ppm = torch.as_tensor(np.fft.ifftshift(g.ppm()), device=self.device, dtype=dtype)
        lo, hi = g.norm_ppm
        self._win = (self._ppm >= lo) & (self._ppm <= hi)
        x = (self._ppm - PPM_REFERENCE) / (self._ppm.max() - PPM_REFERENCE)  # [-1, 1]
        self._poly = torch.stack([x**j for j in range(p.baseline_order + 1)])

    # ---------------------------------------------------------------- parameters
    def _uniform(self, r: Range, n: int, gen: torch.Generator, shape: tuple = ()) -> torch.Tensor:
        u = torch.rand((n, *shape), generator=gen, device=self.device, dtype=self.dtype)
        return r[0] + (r[1] - r[0]) * u

    def _draw(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Every ground-truth parameter, (n,) each, always in the same order (fixed values
        replace draws afterwards, so they never change the other draws)."""
        p = self.profile
        conc = self._lo + (self._hi - self._lo) * torch.rand(
            (n, len(self.metabolites)), generator=gen, device=self.device, dtype=self.dtype)
        truth = {m: conc[:, i] for i, m in enumerate(self.metabolites)}
        mm_g, lip_g = self._uniform(p.mm_scale, n, gen), self._uniform(p.lipid_scale, n, gen)
        jit = 1 + p.mm_jitter * (2 * self._uniform((0, 1), n, gen, (len(self.mm_names),)) - 1)
        mm = torch.where(self._lipid, lip_g[:, None], mm_g[:, None]) * jit
        truth.update({m: mm[:, i] for i, m in enumerate(self.mm_names)})
        for key, r in (("lorentzian_hz", p.lorentzian_hz), ("gaussian_hz", p.gaussian_hz),
                       ("shift_hz", p.shift_hz), ("phase0", p.phase0_deg), ("phase1", p.phase1_deg_per_ppm),
                       ("snr", p.snr), ("water", p.water_amplitude), ("water_width_hz", p.water_width_hz),
                       ("water_offset_hz", p.water_offset_hz), ("baseline", p.baseline_amplitude),
                       ("drift_hz_per_transient", p.drift_hz_per_transient)):
            truth[key] = self._uniform(r, n, gen)
        return truth

    def _apply_fixed(self, truth: dict[str, torch.Tensor], fixed: Mapping[str, Any] | None, n: int) -> None:
        for key, value in (fixed or {}).items():
            if key not in truth:
                raise KeyError(f"cannot fix {key!r}: not a parameter of profile {self.profile.name} "
                               f"(parameters: {sorted(truth)})")
            v = torch.as_tensor(value, dtype=self.dtype, device=self.device)
            truth[key] = v.expand(n).clone() if v.ndim == 0 else v.reshape(n).clone()

    # ---------------------------------------------------------------- signal
    def _metabolite_fids(self, truth: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Σ c_m B_m + Σ a_k MM_k with the Voigt lineshape and shift: complex (n, n_sub, P)."""
        amounts = torch.stack([truth[m] for m in self.metabolites + self.mm_names], dim=1)
        fid = torch.view_as_complex((amounts @ self._bank).view(n, len(self.sub), self.grid.points, 2))
        t = self._t
        decay = torch.exp(-math.pi * truth["lorentzian_hz"][:, None] * t
                          - (math.pi * truth["gaussian_hz"][:, None] * t) ** 2 / (4 * math.log(2)))
        return fid.mul_(torch.polar(decay, 2 * math.pi * truth["shift_hz"][:, None] * t)[:, None, :])

    def _reference_height(self, fid: torch.Tensor) -> torch.Tensor:
        """Tallest real peak of the first row inside grid.norm_ppm (the SNR reference), (n,)."""
        spec = torch.fft.fft(fid[:, 0]).real
        return spec[:, self._win].amax(dim=1).clamp_min(1e-12)

    def _water(self, truth: dict[str, torch.Tensor], height: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Residual water Lorentzian near 4.65 ppm with random phase: complex (n, 1, P)."""
        n, bw = height.shape[0], self.grid.bandwidth_hz
        w = truth["water_width_hz"][:, None]
        amp = truth["water"][:, None] * height[:, None] * (1 - torch.exp(-math.pi * w / bw))
        phase = self._uniform((-math.pi, math.pi), n, gen)[:, None]
        arg = 2 * math.pi * truth["water_offset_hz"][:, None] * self._t + phase
        return torch.polar(amp * torch.exp(-math.pi * w * self._t), arg)[:, None, :]

    def _transients(self, fid: torch.Tensor, truth: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """(n, K, n_sub, P): per-transient linear drift (centred) plus frequency/phase jitter."""
        p, n, k = self.profile, fid.shape[0], self.profile.n_transients
        if k == 1:
            return fid[:, None]
        idx = torch.arange(k, device=self.device, dtype=self.dtype) - (k - 1) / 2
        randn = lambda: torch.randn((n, k), generator=gen, device=self.device, dtype=self.dtype)  # noqa: E731
        df = truth["drift_hz_per_transient"][:, None] * idx + p.freq_jitter_hz * randn()
        dph = math.radians(p.phase_jitter_deg) * randn()
        rot = torch.polar(torch.ones_like(self._t), 2 * math.pi * df[..., None] * self._t + dph[..., None])
        return fid[:, None] * rot[:, :, None, :]

    def _baseline(self, truth: dict[str, torch.Tensor], height: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Low-order complex polynomial in ppm over the whole band: complex (n, P)."""
        n, j = height.shape[0], self._poly.shape[0]
        c = torch.randn((n, j, 2), generator=gen, device=self.device, dtype=self.dtype) / math.sqrt(j)
        amp = (truth["baseline"] * height)[:, None]
        return torch.complex(amp * (c[..., 0] @ self._poly), amp * (c[..., 1] @ self._poly))

    @torch.no_grad()
    def simulate(self, n: int, seed: int = 0, normalise: bool = True,
                 fixed: Mapping[str, Any] | None = None) -> SimBatch:
        """n spectra; `fixed` pins ground-truth parameters (e.g. {"NAA": 10.0, "snr": inf}).

        Random draws always run in one order (parameters, water phase, baseline, transient
        jitter, noise), so pinning a parameter leaves every other draw of the seed unchanged.
        """
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        truth = self._draw(n, gen)
        self._apply_fixed(truth, fixed, n)
        fid = self._metabolite_fids(truth, n)
        height = self._reference_height(fid)
        fid.add_(self._water(truth, height, gen))
        baseline = self._baseline(truth, height, gen)
        x = self._transients(fid, truth, gen)
        k = x.shape[1]
        if k == 1:
            truth.pop("drift_hz_per_transient")  # drawn (keeps the draw order) but meaningless
        spec = torch.fft.fft(x, dim=-1)  # FFT order throughout; in place where possible (memory bound)
        noise = torch.randn((*spec.shape, 2), generator=gen, device=self.device, dtype=self.dtype)
        sigma = (height / truth["snr"] * math.sqrt(k))[:, None, None, None]
        spec.add_(torch.view_as_complex(noise).mul_(sigma))
        phi = torch.deg2rad(truth["phase0"][:, None] + truth["phase1"][:, None] * (self._ppm - PPM_REFERENCE))
        spec.mul_(torch.polar(torch.ones_like(phi), phi)[:, None, None, :]).add_(baseline[:, None, None, :])
        avg = spec[:, 0] if k == 1 else spec.mean(dim=1)
        scale = avg[:, 0, self._win].abs().amax(dim=1) if normalise else torch.ones_like(height)
        truth["norm_scale"] = scale
        avg = torch.fft.ifft(avg / scale[:, None, None], dim=-1)
        trans = torch.fft.ifft(spec.div_(scale[:, None, None, None]), dim=-1) if k > 1 else None
        return SimBatch(
            fid=avg, truth=truth, sub=self.sub, vendor=self.vendor, profile=self.profile.name,
            seed=int(seed), grid=self.grid, metabolites=list(self.metabolites), sequence=self.sequence,
            te_ms=self.basis.te_ms, transients=trans,
        )


# --------------------------------------------------------------------------- files
def _nifti(spec: Spectrum, vendor: str | None, sequence: str, te_ms: float | None, profile: str):
    """A Spectrum -> NIfTI-MRS object (gen_nifti_mrs conjugates to the file convention)."""
    from nifti_mrs.create_nmrs import gen_nifti_mrs

    data = spec.transients if spec.transients is not None else spec.fid[None]  # (K, n_sub, P)
    data = np.moveaxis(data, -1, 0)  # (P, K, n_sub)
    tags = []
    if spec.transients is not None:
        tags.append("DIM_DYN")
    else:
        data = data[:, 0]
    if spec.edited:
        tags.append("DIM_EDIT")
    else:
        data = data[..., 0]
    data = data.reshape(1, 1, 1, *data.shape)
    img = gen_nifti_mrs(data.astype(np.complex64), 1.0 / spec.bandwidth_hz, spec.spectrometer_mhz,
                        nucleus="1H", dim_tags=tags + [None] * (3 - len(tags)))
    if spec.edited:
        img.set_dim_tag("DIM_EDIT", "DIM_EDIT", header={"EditCondition": list(spec.sub)})
    if vendor:
        img.add_hdr_field("Manufacturer", vendor)
    if te_ms is not None:
        img.add_hdr_field("EchoTime", te_ms / 1000.0)
    img.add_hdr_field("SequenceName", sequence)
    img.add_hdr_field("ConversionMethod", f"mrsfm simulate (profile {profile})")
    return img


def write_nifti(spec: Spectrum, batch: SimBatch, path: str | Path) -> Path:
    """One simulated spectrum of `batch` as a NIfTI-MRS file (vendor, sequence, TE in its header)."""
    _nifti(spec, batch.vendor, batch.sequence, batch.te_ms, batch.profile).save(str(path))
    return Path(path)


def write_simulated(profile: str | SimProfile, n: int, out_dir: str | Path, seed: int = 0,
                    grid: CanonicalGrid | None = None, device: torch.device | str | None = None,
                    chunk: int = 1024) -> list[Path]:
    """Write n simulated spectra as NIfTI-MRS `.nii.gz` + a `.json` ground-truth sidecar each.

    Spectra come in chunks of `chunk`; chunk k is `simulate(chunk, seed + k)` (the sidecar's
    `source` names the exact seed and index). Transients go in DIM_DYN when the profile has more
    than one; MEGA-PRESS rows go in DIM_EDIT with EditCondition ["OFF", "ON"].
    """
    sim = Simulator(profile, grid, device=device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = sim.profile.name
    paths: list[Path] = []
    for k, start in enumerate(range(0, n, chunk)):
        batch = sim.simulate(min(chunk, n - start), seed=seed + k)
        for j, spec in enumerate(batch.to_spectra()):
            stem = out_dir / f"{name}_s{seed}_{start + j:06d}"
            write_nifti(spec, batch, str(stem) + ".nii.gz")
            truth = spec.provenance.extra["truth"]
            sidecar = {
                "profile": name, "seed": batch.seed, "index": j, "source": spec.provenance.source,
                "vendor": batch.vendor, "sequence": batch.sequence, "te_ms": batch.te_ms, "sub": list(batch.sub),
                "concentrations_mM": {m: truth[m] for m in batch.metabolites},
                "macromolecules": {m: truth[m] for m in sim.mm_names},
                "snr": truth["snr"], "lorentzian_hz": truth["lorentzian_hz"], "gaussian_hz": truth["gaussian_hz"],
                "shift_hz": truth["shift_hz"], "phase0_deg": truth["phase0"], "phase1_deg_per_ppm": truth["phase1"],
                "truth": truth,
                "grid": {"points": batch.grid.points, "bandwidth_hz": batch.grid.bandwidth_hz,
                         "spectrometer_mhz": batch.grid.spectrometer_mhz},
            }
            Path(str(stem) + ".json").write_text(json.dumps(sidecar, indent=1))
            paths.append(Path(str(stem) + ".nii.gz"))
    return paths


__all__ = ["SimProfile", "SimBatch", "Simulator", "load_profile", "available_profiles", "write_simulated", "write_nifti",
           "parametric_mm", "MM_PEAKS"]
