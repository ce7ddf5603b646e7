"""Linear-combination fit of a basis set: the classical quantification MRS users know.

What LCModel and FSL-MRS do, in batched torch: the spectrum inside a ppm window is modelled as

    S(ppm) = exp(i (phi0 + phi1 (ppm - 4.65))) * sum_k a_k FFT[B_k(t) V(t) exp(i 2 pi shift t)]
             + complex polynomial baseline (per sub-spectrum)

with V(t) the Voigt decay of one Lorentzian and one Gaussian width shared by all components,
B_k the basis set's metabolite and macromolecule FIDs (every sub-spectrum, OFF and ON of
MEGA-PRESS, fitted jointly with the same amplitudes), real amplitudes a_k and the baseline
found by linear least squares for every value of the five nonlinear parameters (variable
projection). Phase0 (drawn over 360 degrees in vivo) and the shift are started from the best
point of a coarse grid, then all five are refined with L-BFGS on the projected residual.

It is the non-deep yardstick of the quantification benchmark (GABA/tCr, NAA/tCr), beside
ridge regression on spectra and the ViT arms. Amplitudes are not constrained to be positive
(LCModel's are); on noise-free spectra generated from the same model it recovers the
amplitudes exactly (tests/test_lcm.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mrsfm_model.data.canonical import CanonicalGrid
from mrsfm_model.data.latents import RATIOS, TCR
from mrsfm_model.data.simulate import Simulator
from mrsfm_model.data.spectrum import PPM_REFERENCE


@dataclass
class FitResult:
    amplitudes: dict[str, torch.Tensor]  # name -> (B,)
    params: dict[str, torch.Tensor]  # lorentzian_hz, gaussian_hz, shift_hz, phase0 (deg), phase1 (deg/ppm)
    residual: torch.Tensor  # (B,) relative residual norm inside the window

    def ratio(self, num: str, *den: str) -> torch.Tensor:
        return self.amplitudes[num] / sum(self.amplitudes[d] for d in den)


class LinearCombinationFit:
    """Fits (B, n_sub, points) canonical FIDs with one basis set (its sub-spectra in the same order)."""

    def __init__(self, names: list[str], bank: torch.Tensor, grid: CanonicalGrid, ppm: tuple[float, float] = (0.2, 4.2),
                 baseline_order: int = 3):
        self.names, self.grid = list(names), grid
        self.bank = bank.to(torch.complex64)  # (K, n_sub, P); float32 FFTs, float64 solves
        axis = torch.as_tensor(np.fft.ifftshift(grid.ppm()))  # FFT order, like torch.fft.fft's output
        self.window = (axis >= ppm[0]) & (axis <= ppm[1])
        self.ppm = axis[self.window].double()
        x = (self.ppm - self.ppm.mean()) / (self.ppm.max() - self.ppm.mean())
        self.poly = torch.stack([x**j for j in range(baseline_order + 1)])  # (J, Nw)
        # residual water (4.65 ppm, any phase, 5-25 Hz wide) reaches into the window with a smooth
        # tail; Lorentzian tails of three widths absorb it linearly
        hz = (self.ppm - PPM_REFERENCE) * grid.spectrometer_mhz
        self.water = torch.stack([1 / (hz + 1j * w) for w in (5.0, 15.0, 30.0)])  # (3, Nw) complex
        self.t = torch.arange(grid.points, dtype=torch.float32) / grid.bandwidth_hz

    @classmethod
    def from_profile(cls, profile: str, grid: CanonicalGrid, **kw) -> LinearCombinationFit:
        """The basis set (metabolites and macromolecules) of a simulation profile."""

        sim = Simulator(profile, grid, device="cpu")
        k, n_sub = sim._bank.shape[0], len(sim.sub)
        bank = torch.view_as_complex(sim._bank.reshape(k, n_sub, grid.points, 2).contiguous())
        return cls(sim.metabolites + sim.mm_names, bank, grid, **kw)

    # -- model pieces ----------------------------------------------------------------------------
    def _components(self, lor: torch.Tensor, gau: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Window of every broadened, shifted basis spectrum: complex (B, K, n_sub, Nw)."""
        t = self.t
        decay = torch.exp(-math.pi * lor[:, None] * t - (math.pi * gau[:, None] * t) ** 2 / (4 * math.log(2)))
        v = torch.polar(decay.float(), (2 * math.pi * shift[:, None] * t).float())  # (B, P)
        return torch.fft.fft(self.bank[None] * v[:, None, None, :], dim=-1)[..., self.window].to(torch.complex128)

    def _design(self, comps: torch.Tensor, phase0: torch.Tensor, phase1: torch.Tensor) -> torch.Tensor:
        """Real design matrix (B, 2 * n_sub * Nw, K + 2 * nuisance): phased components, then the
        real and imaginary coefficients of the nuisance columns (one polynomial baseline per
        sub-spectrum, the water tails)."""
        phi = torch.deg2rad(phase0[:, None] + phase1[:, None] * (self.ppm - PPM_REFERENCE))
        cols = comps * torch.polar(torch.ones_like(phi), phi)[:, None, None, :]
        b, k, s, nw = cols.shape
        cols = cols.reshape(b, k, s * nw)
        j = self.poly.shape[0]
        base = torch.zeros(s * j, s, nw, dtype=torch.complex128)  # one polynomial per sub-spectrum
        for i in range(s):
            base[i * j:(i + 1) * j, i] = self.poly
        u = torch.cat([base.reshape(s * j, s * nw), self.water.repeat(1, s)]).expand(b, -1, -1)
        # a complex coefficient p + iq on column u adds p Re(u) - q Im(u) to the real part, p Im(u) + q Re(u) to the imaginary
        real = torch.cat([cols.real, u.real, -u.imag], 1)
        imag = torch.cat([cols.imag, u.imag, u.real], 1)
        return torch.cat([real, imag], dim=2).transpose(1, 2)

    @staticmethod
    def _solve(a: torch.Tensor, y: torch.Tensor, ridge: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares coefficients and residual sum of squares, batched (normal equations)."""
        ata = a.transpose(1, 2) @ a
        eye = torch.eye(ata.shape[-1], dtype=a.dtype) * ridge * ata.diagonal(dim1=1, dim2=2).mean(1)[:, None, None]
        coef = torch.linalg.solve(ata + eye, (a.transpose(1, 2) @ y[..., None]))[..., 0]
        res = y - (a @ coef[..., None])[..., 0]
        return coef, res.square().sum(1)

    _STEP = torch.tensor([1e-3, 1e-3, 1e-3, 1e-2, 1e-2], dtype=torch.float64)  # finite-difference steps
    _FLOOR = torch.tensor([0.05, 0.05, -50.0, -1e9, -1e9], dtype=torch.float64)  # widths stay positive

    def _residual(self, theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Variable-projection residual y - A(theta) c(theta), (B, R)."""
        a = self._design(self._components(theta[:, 0], theta[:, 1], theta[:, 2]), theta[:, 3], theta[:, 4])
        coef, _ = self._solve(a, y)
        return y - (a @ coef[..., None])[..., 0]

    def _levenberg_marquardt(self, theta: torch.Tensor, y: torch.Tensor, iters: int) -> torch.Tensor:
        """Per-spectrum damped Gauss-Newton on the five nonlinear parameters (finite-difference Jacobian)."""
        lam = torch.full((theta.shape[0],), 1e-3, dtype=torch.float64)
        r = self._residual(theta, y)
        cost = r.square().sum(1)
        for _ in range(iters):
            jac = torch.stack([(self._residual(theta + torch.eye(5, dtype=torch.float64)[i] * self._STEP[i], y) - r)
                               / self._STEP[i] for i in range(5)], dim=2)  # (B, R, 5)
            jtj, jtr = jac.transpose(1, 2) @ jac, (jac.transpose(1, 2) @ r[..., None])[..., 0]
            damp = lam[:, None, None] * torch.diag_embed(jtj.diagonal(dim1=1, dim2=2) + 1e-12)
            step = torch.linalg.solve(jtj + damp, -jtr)
            trial = torch.maximum(theta + step, self._FLOOR)
            r_new = self._residual(trial, y)
            cost_new = r_new.square().sum(1)
            ok = cost_new < cost
            theta = torch.where(ok[:, None], trial, theta)
            r = torch.where(ok[:, None], r_new, r)
            cost = torch.where(ok, cost_new, cost)
            lam = torch.where(ok, lam / 3, lam * 4).clamp(1e-9, 1e9)
        return theta

    # -- the fit -----------------------------------------------------------------------------------
    def fit(self, fid: torch.Tensor, chunk: int = 64, **kw) -> FitResult:
        """Fit (B, n_sub, points) FIDs, or one (n_sub, points), in chunks (each spectrum on its own)."""
        fid = torch.as_tensor(fid)
        if fid.dim() == 2:
            fid = fid[None]
        parts = [self._fit(part, **kw) for part in fid.split(chunk)]
        return FitResult(amplitudes={n: torch.cat([p.amplitudes[n] for p in parts]) for n in self.names},
                         params={k: torch.cat([p.params[k] for p in parts]) for k in parts[0].params},
                         residual=torch.cat([p.residual for p in parts]))

    def _fit(self, fid: torch.Tensor, iters: int = 25, phase_grid: int = 16,
             shift_grid: tuple[float, ...] = (-12.0, -6.0, 0.0, 6.0, 12.0)) -> FitResult:
        fid = torch.as_tensor(fid).to(torch.complex128)
        spec = torch.fft.fft(fid, dim=-1)[..., self.window]  # (B, S, Nw)
        sp = spec.reshape(spec.shape[0], -1)
        y = torch.cat([sp.real, sp.imag], dim=1)
        b = spec.shape[0]
        lor, gau = torch.full((b,), 4.0, dtype=torch.float64), torch.full((b,), 6.0, dtype=torch.float64)
        zero = torch.zeros(b, dtype=torch.float64)
        best = torch.full((b,), float("inf"), dtype=torch.float64)
        p0, sh = zero.clone(), zero.clone()
        with torch.no_grad():  # coarse start over shift and phase0
            for s in shift_grid:
                comps = self._components(lor, gau, zero + s)
                for ph in np.linspace(-180, 180, phase_grid, endpoint=False):
                    _, rss = self._solve(self._design(comps, zero + ph, zero), y)
                    better = rss < best
                    best, p0, sh = torch.where(better, rss, best), torch.where(better, ph, p0), torch.where(better, s, sh)
        theta = torch.stack([lor, gau, sh, p0, zero], 1)
        theta = self._levenberg_marquardt(theta, y, iters)

        def design(th):
            return self._design(self._components(th[:, 0], th[:, 1], th[:, 2]), th[:, 3], th[:, 4])

        with torch.no_grad():
            coef, rss = self._solve(design(theta), y)
            lo, ga, shf, ph0, ph1 = theta.unbind(1)
            k = len(self.names)
            # a real amplitude vector and phase0 + 180 degrees with the negated amplitudes are the same
            # model: report the one with a positive total metabolite signal
            flip = coef[:, :k].sum(1) < 0
            coef = torch.where(flip[:, None], -coef, coef)
            ph0 = torch.where(flip, ph0 + 180, ph0)
        return FitResult(
            amplitudes={n: coef[:, i].float() for i, n in enumerate(self.names[:k])},
            params={"lorentzian_hz": lo.float(), "gaussian_hz": ga.float(), "shift_hz": shf.float(),
                    "phase0": ((ph0 + 180) % 360 - 180).float(), "phase1": ph1.float()},
            residual=(rss / y.square().sum(1)).sqrt().float(),
        )


def fit_profile(edited: bool, vendor: str | None) -> str:
    """The simulation profile whose basis set fits a spectrum: MEGA-PRESS or PRESS of its vendor;
    FID-A's vendor-neutral MEGA-PRESS set (edited) or GE's PRESS set (unedited) when the vendor is
    not known."""
    known = {"GE": "ge", "Philips": "philips", "Siemens": "siemens"}
    if vendor in known:
        return f"{'megapress' if edited else 'press'}_{known[vendor]}"
    return "megapress_fida" if edited else "press_ge"


def fit_ratio_features(spectra: list, grid: CanonicalGrid) -> np.ndarray:
    """What an MRS user computes today, per spectrum: a linear-combination fit with the basis set of
    its sequence and vendor (`fit_profile`), reported as log(group amplitude / tCr) for every
    metabolite group of data/latents.RATIOS (groups a basis lacks are 0). Input: canonical
    Spectrum objects; output (N, len(RATIOS)), the features of the study's `fit` arm."""
    out = np.zeros((len(spectra), len(RATIOS)))
    by_profile: dict[str, list[int]] = {}
    for i, s in enumerate(spectra):
        by_profile.setdefault(fit_profile(s.edited, s.provenance.vendor), []).append(i)
    for profile, rows in by_profile.items():
        lcm = LinearCombinationFit.from_profile(profile, grid)
        sub = Simulator(profile, grid, device="cpu").sub
        fids = np.stack([np.stack([spectra[i].row(name) for name in sub]) for i in rows])
        amp = lcm.fit(torch.from_numpy(fids)).amplitudes
        tcr = sum(amp[m] for m in TCR if m in amp).clamp_min(1e-6)
        for j, members in enumerate(RATIOS.values()):
            present = [m for m in members if m in amp]
            if present:
                out[rows, j] = torch.log((sum(amp[m] for m in present) / tcr).clamp_min(1e-3)).numpy()
    return out
