"""Built-in few-label benchmarks, simulated so that ground truth is exact.

Vendor task (GE / Philips / Siemens): each simulated *subject* has one set of metabolite
concentrations and is scanned `scans_per_subject` times on one vendor's MEGA-PRESS (each
scan with its own linewidth, shift, phase, baseline, water, SNR and noise). Vendors differ
only through their basis sets (their editing and refocusing pulses); every nuisance range
is shared, and everything is on the canonical grid with amplitude normalisation, so length,
scale, noise level or total power carry no vendor information (`trivial_features` checks it).
Train and test are split by subject. Benchmark seeds start at BENCH_SEED_BASE, beyond every
seed the pretraining stream can draw (< 2**31), so pretraining never sees a test spectrum.

Quantification task: regression of GABA/tCr and NAA/tCr (tCr = Cr + PCr) from the same
spectra's ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mrsfm_model.data.canonical import CanonicalGrid
from mrsfm_model.data.simulate import Simulator, load_profile
from mrsfm_model.data.spectrogram import SpectrogramTransform
from mrsfm_model.data.spectrum import VENDORS, select_channels
from mrsfm_model.data.stream import InputBuilder
from mrsfm_model.evaluation.lcm import LinearCombinationFit

BENCH_SEED_BASE = 2**40
VENDOR_PROFILES = ("megapress_ge", "megapress_philips", "megapress_siemens")
QUANT_TARGETS = ("GABA/tCr", "NAA/tCr")
# which of the pretrained quantifier's estimates (latents.decode) answers each target
HEAD_ESTIMATES = {"GABA/tCr": "GABA/tCr", "NAA/tCr": "tNAA/tCr"}


@dataclass
class Benchmark:
    x: torch.Tensor  # (N, C, H, W) spectrograms
    vendor: torch.Tensor  # (N,) index into VENDORS
    subject: torch.Tensor  # (N,) subject id (unique across vendors)
    test: torch.Tensor  # (N,) bool: held-out subjects
    ratios: torch.Tensor  # (N, len(QUANT_TARGETS))
    trivial: torch.Tensor  # (N, 4) length, max |fid|, noise level, total power
    spectra: torch.Tensor  # (N, C * bins) magnitude spectra 0.2-4.2 ppm: the non-deep baseline's input
    fids: torch.Tensor  # (N, n_sub, points) complex: the scans' own sub-spectra (linear-combination fit)
    profiles: tuple[str, ...]  # the simulation profile of each vendor index (its basis set)

    def labelled_sample(self, n: int, seed: int) -> torch.Tensor:
        """Indices of a stratified (per vendor) random sample of n training spectra."""
        rng = np.random.default_rng([seed, n])
        train = ~self.test.numpy()
        classes = np.unique(self.vendor.numpy())
        per = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
        idx = [rng.choice(np.flatnonzero(train & (self.vendor.numpy() == c)), k, replace=False)
               for c, k in zip(classes, per)]
        return torch.from_numpy(np.sort(np.concatenate(idx)))


def spectrum_features(fid: torch.Tensor, grid: CanonicalGrid, ppm: tuple[float, float] = (0.2, 4.2)) -> torch.Tensor:
    """Magnitude spectra of every channel inside `ppm`, flattened: what a non-deep model sees."""
    spec = torch.fft.fftshift(torch.fft.fft(fid, dim=-1), dim=-1).abs()
    axis = torch.as_tensor(grid.ppm(), device=fid.device)
    return spec[..., (axis >= ppm[0]) & (axis <= ppm[1])].flatten(1).float().cpu()


def trivial_features(fid: torch.Tensor, grid: CanonicalGrid) -> torch.Tensor:
    """Shortcut features a vendor classifier must not be able to use: (n, 4)."""
    first = fid[:, 0]
    spec = torch.fft.fftshift(torch.fft.fft(first, dim=-1), dim=-1)
    ppm = torch.as_tensor(grid.ppm(), device=fid.device)
    empty = (ppm > 9.0) & (ppm < 11.0)
    noise = spec[:, empty].real.std(dim=1)
    return torch.stack([
        torch.full_like(noise, first.shape[-1]), first.abs().amax(dim=1), noise, first.abs().square().sum(dim=1),
    ], dim=1).float().cpu()


@torch.no_grad()
def build_benchmark(
    grid: CanonicalGrid, transform: SpectrogramTransform, channels: Sequence[str],
    subjects_per_vendor: int, scans_per_subject: int, test_fraction: float, seed: int,
    device: torch.device | str = "cpu", profiles: Sequence[str] = VENDOR_PROFILES, noise_free: bool = False,
) -> Benchmark:
    """`noise_free`: the very same subjects and scans with snr = inf (an oracle's input)."""
    xs, vendors, subjects, ratios, trivial, tests, spectra, fids = [], [], [], [], [], [], [], []
    by_vendor: dict[int, str] = {}
    rng = np.random.default_rng([seed, 7])
    for v, name in enumerate(profiles):
        sim = Simulator(load_profile(name), grid, device=device)
        by_vendor[VENDORS.index(sim.vendor)] = name
        base = BENCH_SEED_BASE + (seed * len(profiles) + v) * (scans_per_subject + 1)
        people = sim.simulate(subjects_per_vendor, seed=base)  # one draw of concentrations per subject
        fixed = {m: people.truth[m] for m in sim.metabolites}
        test = torch.from_numpy(rng.permutation(subjects_per_vendor) < round(test_fraction * subjects_per_vendor))
        tcr = people.truth["Cr"] + people.truth["PCr"]
        ratio = torch.stack([people.truth["GABA"] / tcr, people.truth["NAA"] / tcr], dim=1).float().cpu()
        for s in range(scans_per_subject):
            scan = sim.simulate(subjects_per_vendor, seed=base + 1 + s,
                                fixed={**fixed, "snr": float("inf")} if noise_free else fixed)
            chans = select_channels(scan.fid, scan.sub, channels)
            xs.append(transform(chans).float().cpu())
            spectra.append(spectrum_features(chans, grid))
            fids.append(scan.fid.to(torch.complex64).cpu())
            trivial.append(trivial_features(scan.fid, grid))
            vendors.append(torch.full((subjects_per_vendor,), VENDORS.index(sim.vendor)))
            subjects.append(torch.arange(subjects_per_vendor) + v * subjects_per_vendor)
            ratios.append(ratio)
            tests.append(test)
    return Benchmark(torch.cat(xs), torch.cat(vendors), torch.cat(subjects), torch.cat(tests), torch.cat(ratios),
                     torch.cat(trivial), torch.cat(spectra), torch.cat(fids),
                     tuple(by_vendor.get(v, "") for v in range(len(VENDORS))))


def benchmark_from_config(cfg, seed: int | None = None, device: torch.device | str = "cpu",
                          noise_free: bool = False) -> Benchmark:
    """The benchmark as configured (`finetune.benchmark`, inputs from `data`), so scripts read its
    settings instead of repeating them; `seed`: another split than the configured one (screens use
    1, validation)."""
    b = InputBuilder.from_data_config(cfg.data)
    bc = cfg.finetune.benchmark
    return build_benchmark(b.grid, b.transform, b.channels, int(bc.subjects_per_vendor), int(bc.scans_per_subject),
                           float(bc.test_fraction), int(bc.seed if seed is None else seed), device,
                           noise_free=noise_free)


def generators_seen(sim_profiles: Sequence[str], profiles: Sequence[str] = VENDOR_PROFILES) -> list[str]:
    """The benchmark profiles whose basis set (the generator of their spectra) is among the
    pretraining profiles'. Empty: the benchmark measures transfer (data/transfer.yaml)."""
    used = {load_profile(p).basis_path().resolve() for p in sim_profiles}
    return [p for p in profiles if load_profile(p).basis_path().resolve() in used]


def lcm_ratios(bench: Benchmark, idx: torch.Tensor, grid: CanonicalGrid) -> torch.Tensor:
    """QUANT_TARGETS of spectra `idx` by the linear-combination fit, each with its vendor's basis set:
    (len(idx), len(QUANT_TARGETS)). No labels are used: it is what an MRS user would report."""

    out = torch.zeros(len(idx), len(QUANT_TARGETS))
    for v, profile in enumerate(bench.profiles):
        sel = (bench.vendor[idx] == v).nonzero()[:, 0]
        if not profile or not len(sel):
            continue
        fit = LinearCombinationFit.from_profile(profile, grid).fit(bench.fids[idx[sel]])
        out[sel] = torch.stack([fit.ratio("GABA", "Cr", "PCr"), fit.ratio("NAA", "Cr", "PCr")], 1)
    return out


def shortcut_accuracy(bench: Benchmark, steps: int = 500) -> float:
    """Test accuracy of a logistic regression on the trivial features alone (chance = 1/3)."""
    train, test = ~bench.test, bench.test
    f = bench.trivial
    mu, sd = f[train].mean(0), f[train].std(0).clamp_min(1e-12)
    z = (f - mu) / sd
    y = bench.vendor
    torch.manual_seed(0)
    lin = torch.nn.Linear(z.shape[1], len(VENDORS))
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(z[train]), y[train])
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(z[test]).argmax(1) == y[test]).float().mean())
