"""A site's private in vivo-like set: what the shared simulator lacks and a hospital's scanner adds.

Why: every site trains on the shared simulated stream; what a federation can add is each hospital's
own spectra, which carry its scanner's and its patients' artifacts, are few and cannot be pooled. A
site's set here is that: `realism.spectra` spectra of the shared simulator (its `realism.profiles`),
acquired as `realism.transients` transients each, corrupted by SMART-MRS's artifact models (Bugler et
al. 2024: eddy currents, spurious echoes, lipid and other nuisance peaks, frequency drift, motion,
line broadening, baselines, first-order phase, noise), then averaged. Each site's mix and strengths
are in its `configs/site/<site>.yaml` (`realism:`; the defaults, all off, in `site/_common.yaml`).

How SMART-MRS is called: its functions take FIDs (transients, points) with a time axis (s) and a ppm
axis in fftshift order, rising (this project's convention too), and a Larmor frequency; its
amplitudes are on the scale of spectra whose tallest peak is ~1, which is the simulator's
normalisation (reference peak = 1), so an amplitude here is a peak height x the reference peak. An
edited spectrum's transients are interleaved ON, OFF, ON, ... as acquired (SMART-MRS's `interleave`).
Artifacts act on the simulator's noise-free transients, per-transient ones before the average and
`baseline`, `first_order_phase` and `noise` on the averaged spectrum (SMART-MRS adds a baseline to
the magnitude with the spectrum's own phase: on noisy transients it would average away); the
simulator's own noise of the same draw is added last.
SMART-MRS 2.1 draws from the global `numpy.random` and `random` states: each call here runs with
both seeded from the set's seed and restored afterwards, and every parameter it would draw is drawn
here instead, from a generator of (seed, profile, spectrum, artifact), so that turning one artifact on
or off leaves the others' draws unchanged. Two of its recipes do not run as shipped (2.1:
`add_lipid_artifact` reads a variable before setting it; `add_subtle_motion_artifact` passes a float
transient count): their artifact functions are called with the recipes' settings instead. Its
spurious echo adds `phase` to the exponent's real part (a gain, not a phase): the phase is put in a
complex amplitude, and the amplitude set so that the echo's spectral peak has the configured height.
Its first-order phase multiplies (ppm - median ppm) by `lf`: given in MHz, that is Hz, and its
`tshift` a delay in seconds (with the Hz default, a delay a million times longer).

A set is a function of its settings and `realism.seed` (simulated on the CPU: CUDA's random
streams differ). `qc_report` runs the loaders' QC gate (data/quality.py) over a set, per artifact.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mrsfm_model.config import config_names, from_section, load_config, plain
from mrsfm_model.data.canonical import CanonicalGrid, norm_factor, to_canonical
from mrsfm_model.data.quality import Quality, QualityConfig, measure
from mrsfm_model.data.simulate import Simulator, _nifti, available_profiles, load_profile
from mrsfm_model.data.spectrum import PPM_REFERENCE, Spectrum
from mrsfm_model.errors import MRSDataError

Range = tuple[float, float]
SECTION = "site.realism"
CHUNK = 32  # spectra simulated at once (memory: chunk x transients x rows x points complex64)


# --------------------------------------------------------------------------- the scan artifacts act on
@dataclass
class Scan:
    """One spectrum as SMART-MRS sees it: FIDs (rows, points) complex128 (transients, interleaved
    ON/OFF when edited; or the averaged rows), its time (s) and ppm axes, the Larmor frequency (Hz)."""

    fids: np.ndarray
    time: np.ndarray
    ppm: np.ndarray
    lf_hz: float
    edited: bool

    @property
    def rows(self) -> int:
        return int(self.fids.shape[0])


def _u(rng: np.random.Generator, r: Range, size: int | None = None):
    x = rng.uniform(r[0], r[1], size=size)
    return float(x) if size is None else x


def _count(share: float, rows: int) -> int:
    return min(rows, max(1, round(share * rows)))


def _some(rng: np.random.Generator, share: float, rows: int) -> list[int]:
    """A random subset of the rows (at least one)."""
    return sorted(int(i) for i in rng.choice(rows, _count(share, rows), replace=False))


def _cluster(rng: np.random.Generator, share: float, rows: int) -> list[int]:
    """Consecutive rows (at least one): what one movement spoils."""
    k = _count(share, rows)
    start = int(rng.integers(0, rows - k + 1))
    return list(range(start, start + k))


# --------------------------------------------------------------------------- artifacts
@dataclass(frozen=True)
class Artifact:
    """Settings of one artifact (keys and defaults: configs/site/_common.yaml `realism.artifacts`)."""

    NAME: ClassVar[str] = ""
    STAGE: ClassVar[str] = "transients"  # transients: before the average; average: after it
    SIGNED: ClassVar[tuple[str, ...]] = ()  # ranges that may be negative
    POSITIVE: ClassVar[tuple[str, ...]] = ()  # ranges that must be above zero
    scans: float  # share of the site's spectra that carry it

    def check(self, section: str) -> None:
        """ValueError naming the key: a share outside 0-1, a negative strength, a reversed range."""
        for f in fields(self):
            value, key = getattr(self, f.name), f"config {section}.{f.name}"
            vals = value if isinstance(value, tuple) else (value,)
            shown = list(value) if isinstance(value, tuple) else value
            if not all(math.isfinite(v) for v in vals):
                raise ValueError(f"{key}: must be finite, got {shown}")
            if f.name in ("scans", "transients") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}: a share between 0 and 1, got {shown}")
            if f.name not in self.SIGNED and any(v < 0 for v in vals):
                raise ValueError(f"{key}: a strength cannot be negative, got {shown}")
            if f.name in self.POSITIVE and any(v <= 0 for v in vals):
                raise ValueError(f"{key}: must be above zero, got {shown}")
            if isinstance(value, tuple) and value[0] > value[1]:
                raise ValueError(f"{key}: a range [low, high] needs low <= high, got {shown}")

    def apply(self, scan: Scan, rng: np.random.Generator) -> dict[str, Any]:
        """Corrupt scan.fids (replaced or changed in place); the drawn settings, for the record."""
        raise NotImplementedError


@dataclass(frozen=True)
class EddyCurrent(Artifact):
    NAME = "eddy_current"
    POSITIVE = ("time_constant_s",)
    amplitude_hz: Range
    time_constant_s: Range

    def apply(self, scan, rng):
        from SMART_MRS.artifacts import add_eddy_current_artifact

        a, tc = _u(rng, self.amplitude_hz), _u(rng, self.time_constant_s)
        scan.fids, _ = add_eddy_current_artifact(scan.fids, scan.time, amp=[a] * scan.rows, tc=[tc] * scan.rows,
                                                 locs=list(range(scan.rows)))
        return {"amplitude_hz": a, "time_constant_s": tc}


@dataclass(frozen=True)
class LineBroadening(Artifact):
    NAME = "line_broadening"
    hz: Range

    def apply(self, scan, rng):
        from SMART_MRS.artifacts import add_linebroad

        d = _u(rng, self.hz)
        scan.fids, _ = add_linebroad(scan.fids, scan.time, damp=[d] * scan.rows, locs=list(range(scan.rows)))
        return {"hz": d}


@dataclass(frozen=True)
class NuisancePeak(Artifact):
    NAME = "nuisance_peak"
    POSITIVE = ("width_ppm",)
    transients: float
    amplitude: Range
    width_ppm: Range
    ppm: Range
    phase_rad: Range

    def _edit_ratio(self, rng: np.random.Generator) -> float | None:
        return None

    def apply(self, scan, rng):
        from SMART_MRS.artifacts import add_nuisance_peak

        locs = _some(rng, self.transients, scan.rows)
        amp = _u(rng, self.amplitude, len(locs))
        width, ppm, phase = _u(rng, self.width_ppm), _u(rng, self.ppm), _u(rng, self.phase_rad)
        ratio = self._edit_ratio(rng) if scan.edited else None
        profile = {"peak_type": "G", "amp": amp.tolist(), "width": [width] * len(locs), "res_freq": [ppm] * len(locs),
                   "phase": [phase] * len(locs), "edited": ratio}  # edited: every other affected transient's gain
        scan.fids, _ = add_nuisance_peak(scan.fids, scan.time, profile, cf_ppm=PPM_REFERENCE, lf=scan.lf_hz, locs=locs)
        return {"transients": len(locs), "amplitude": float(amp.mean()), "width_ppm": width, "ppm": ppm,
                "phase_rad": phase, **({"edit_ratio": ratio} if ratio is not None else {})}


@dataclass(frozen=True)
class Lipid(NuisancePeak):
    """SMART-MRS's lipid recipe (a Gaussian nuisance peak near 1.3-1.5 ppm, ON/OFF gains apart)."""

    NAME = "lipid"
    edit_ratio: Range

    def _edit_ratio(self, rng):
        return _u(rng, self.edit_ratio)


@dataclass(frozen=True)
class SpuriousEcho(Artifact):
    NAME = "spurious_echo"
    POSITIVE = ("decay_s",)
    transients: float
    amplitude: Range
    ppm: Range
    echo_time: Range  # x acquisition time
    decay_s: Range
    phase_rad: Range

    def check(self, section):
        super().check(section)
        if self.echo_time[1] > 1.0:
            raise ValueError(f"config {section}.echo_time: a share of the acquisition time (0-1), "
                             f"got {list(self.echo_time)}")

    def apply(self, scan, rng):
        from SMART_MRS.artifacts import add_spur_echo_artifact

        locs = _some(rng, self.transients, scan.rows)
        k = len(locs)
        height, cs = _u(rng, self.amplitude, k), _u(rng, self.ppm, k)
        t_echo, t2, phase = _u(rng, self.echo_time, k), _u(rng, self.decay_s, k), _u(rng, self.phase_rad, k)
        kw = {"cf_ppm": PPM_REFERENCE, "lf": scan.lf_hz}
        # the spectral peak of a unit echo of these settings, so that `amplitude` is a peak height
        unit, _ = add_spur_echo_artifact(np.zeros((k, scan.fids.shape[1]), complex), scan.time, amp=[1.0] * k,
                                         cs=cs, phase=[0.0] * k, t_echo=t_echo, t2=t2, locs=list(range(k)), **kw)
        peak = np.abs(np.fft.fft(unit, axis=1)).max(axis=1)
        amp = height / peak * np.exp(1j * phase)
        scan.fids, _ = add_spur_echo_artifact(scan.fids, scan.time, amp=list(amp), cs=cs, phase=[0.0] * k,
                                              t_echo=t_echo, t2=t2, locs=locs, **kw)
        return {"transients": k, "amplitude": float(height.max()), "ppm": cs.tolist()}


@dataclass(frozen=True)
class FrequencyDrift(Artifact):
    NAME = "frequency_drift"
    SIGNED = ("total_hz",)
    total_hz: Range
    jitter_hz: float

    def apply(self, scan, rng):
        from SMART_MRS.artifacts import add_freq_drift_linear

        total = _u(rng, self.total_hz)
        scan.fids, _ = add_freq_drift_linear(scan.fids, scan.time, freq_offset_var=self.jitter_hz, freq_shift=total,
                                             start_trans=0, num_trans=scan.rows)
        return {"total_hz": total}


@dataclass(frozen=True)
class Motion(Artifact):
    """SMART-MRS's subtle-motion recipe: frequency and zero-order phase jumps on a cluster."""

    NAME = "motion"
    transients: float
    frequency_hz: float
    phase_deg: float

    def apply(self, scan, rng):
        from SMART_MRS.artifacts import add_freq_shift, add_zero_order_phase_shift

        locs = _cluster(rng, self.transients, scan.rows)
        scan.fids, _ = add_freq_shift(scan.fids, scan.time, freq_var=self.frequency_hz, dist="N", locs=locs)
        scan.fids, _ = add_zero_order_phase_shift(scan.fids, phase_var=self.phase_deg, dist="N", locs=locs)
        return {"transients": len(locs), "first": locs[0]}


@dataclass(frozen=True)
class MotionDisruptive(Artifact):
    """SMART-MRS's disruptive-motion recipe (10-18 Hz broadening and a spline baseline) on a cluster."""

    NAME = "motion_disruptive"
    transients: float

    def apply(self, scan, rng):
        from SMART_MRS.applied import add_disruptive_motion_artifact

        locs = _cluster(rng, self.transients, scan.rows)
        scan.fids, _ = add_disruptive_motion_artifact(scan.fids, scan.time, scan.ppm, locs=locs)
        return {"transients": len(locs), "first": locs[0]}


@dataclass(frozen=True)
class Baseline(Artifact):
    NAME = "baseline"
    STAGE = "average"
    amplitude: Range
    compression: Range
    bases: int

    def check(self, section):
        super().check(section)
        if self.bases < 1:
            raise ValueError(f"config {section}.bases: at least 1, got {self.bases}")

    def apply(self, scan, rng):
        from SMART_MRS.artifacts import add_baseline

        amp, comp = _u(rng, self.amplitude, self.bases), _u(rng, self.compression, self.bases)
        profile = {"base_type": "SN", "num_bases": self.bases, "amp_bases": amp.tolist(), "base_var": None,
                   "comp_bases": comp.tolist(), "slope_bases": None, "spline_fitted": False}
        scan.fids, _ = add_baseline(scan.fids, scan.ppm, profile, locs=list(range(scan.rows)))
        return {"amplitude": amp.tolist(), "compression": comp.tolist()}


@dataclass(frozen=True)
class FirstOrderPhase(Artifact):
    NAME = "first_order_phase"
    STAGE = "average"
    SIGNED = ("delay_ms",)
    delay_ms: Range

    def apply(self, scan, rng):
        from SMART_MRS.artifacts import add_first_order_phase_shift

        delay = _u(rng, self.delay_ms)
        # its frequency axis is (ppm - median ppm) x lf: with lf in MHz that is Hz, and tshift is seconds
        scan.fids, _ = add_first_order_phase_shift(scan.fids, scan.ppm, tshift=delay / 1000.0, lf=scan.lf_hz / 1e6,
                                                   locs=list(range(scan.rows)))
        return {"delay_ms": delay}


@dataclass(frozen=True)
class Noise(Artifact):
    NAME = "noise"
    STAGE = "average"
    level: Range

    def apply(self, scan, rng):
        from SMART_MRS.artifacts import add_time_domain_noise

        level = _u(rng, self.level)  # spectral real-part std = time-domain std x sqrt(points)
        scan.fids = add_time_domain_noise(scan.fids, noise_level=level / math.sqrt(scan.fids.shape[1]))
        return {"level": level}


# in the order they act: the acquisition's (transients), then the averaged spectrum's
ARTIFACTS: dict[str, type[Artifact]] = {a.NAME: a for a in (
    EddyCurrent, LineBroadening, Lipid, NuisancePeak, SpuriousEcho, Motion, MotionDisruptive, FrequencyDrift,
    Baseline, FirstOrderPhase, Noise)}


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class RealismConfig:
    """A site's `realism:` block, checked: every bad value is a ValueError naming its key."""

    spectra: int
    seed: int
    profiles: tuple[str, ...]
    transients: int
    artifacts: dict[str, Artifact]  # every known artifact, in ARTIFACTS order; scans 0: off

    @classmethod
    def from_mapping(cls, block: Mapping | None, section: str = SECTION) -> RealismConfig:
        block = plain(block)
        if not isinstance(block, Mapping):
            raise ValueError(f"config {section}: expected a mapping of settings, got {block!r}")
        top = {"spectra", "seed", "profiles", "transients", "artifacts"}
        if unknown := sorted(set(block) - top):
            raise ValueError(f"config {section}.{unknown[0]}: unknown key (known: {', '.join(sorted(top))})")
        if missing := sorted(top - set(block)):
            raise ValueError(f"config {section}: missing {', '.join(missing)}")
        for key in ("spectra", "seed", "transients"):
            value = block[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"config {section}.{key}: expected int, got {value!r}")
        if block["spectra"] < 1 or block["transients"] < 1:
            key = "spectra" if block["spectra"] < 1 else "transients"
            raise ValueError(f"config {section}.{key}: at least 1, got {block[key]}")
        profiles = block["profiles"]
        if not isinstance(profiles, (list, tuple)) or not all(isinstance(p, str) for p in profiles):
            raise ValueError(f"config {section}.profiles: expected a list of simulation profile names, got {profiles!r}")
        if not profiles:
            raise ValueError(f"config {section}.profiles: empty; name the simulation profiles (configs/simulation) "
                             "the site's spectra are drawn from")
        known = available_profiles()
        if bad := [p for p in profiles if p not in known]:
            raise ValueError(f"config {section}.profiles: unknown simulation profile {bad[0]!r} "
                             f"(known: {', '.join(known)})")
        arts = block["artifacts"]
        if not isinstance(arts, Mapping):
            raise ValueError(f"config {section}.artifacts: expected a mapping of artifact name to settings, got {arts!r}")
        if unknown := [a for a in arts if a not in ARTIFACTS]:
            raise ValueError(f"config {section}.artifacts.{unknown[0]}: unknown artifact (known: "
                             f"{', '.join(ARTIFACTS)})")
        artifacts = {}
        for name, kind in ARTIFACTS.items():
            sub = f"{section}.artifacts.{name}"
            if name not in arts:
                raise ValueError(f"config {sub}: missing (configs/site/_common.yaml has every artifact's defaults)")
            settings = arts[name]
            if not isinstance(settings, Mapping):
                raise ValueError(f"config {sub}: expected a mapping of settings, got {settings!r}")
            names = [f.name for f in fields(kind)]
            if unknown := [k for k in settings if k not in names]:
                raise ValueError(f"config {sub}.{unknown[0]}: unknown key (known: {', '.join(names)})")
            art = from_section(kind, settings, sub)
            art.check(sub)
            artifacts[name] = art
        return cls(int(block["spectra"]), int(block["seed"]), tuple(profiles), int(block["transients"]), artifacts)

    @property
    def active(self) -> list[str]:
        return [n for n, a in self.artifacts.items() if a.scans > 0]


def site_realism(site: str, overrides: Sequence[str] = ()) -> RealismConfig:
    """A site's realism settings from configs/site/<site>.yaml (`overrides`: Hydra words such as
    `site.realism.spectra=24`)."""
    if site not in (sites := config_names("site")):
        raise ValueError(f"unknown site {site!r}; known sites: {', '.join(sites) or '(none)'} (configs/site/*.yaml)")
    cfg = load_config([f"+site={site}", *overrides])
    return RealismConfig.from_mapping(cfg.site.get("realism"), SECTION)


# --------------------------------------------------------------------------- building a set
@contextlib.contextmanager
def _global_seed(seed: int) -> Iterator[None]:
    """numpy's and Python's global random states seeded for SMART-MRS, restored afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _seed(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0])


@dataclass
class RealisticSet:
    """A site's in vivo-like spectra (averaged, canonical grid, reference peak 1) and, for each, the
    artifacts it carries with their drawn settings (also in provenance.extra["artifacts"])."""

    site: str
    config: RealismConfig
    spectra: list[Spectrum]
    artifacts: list[dict[str, dict[str, Any]]]

    def __len__(self) -> int:
        return len(self.spectra)

    def carrying(self, name: str) -> list[int]:
        return [i for i, a in enumerate(self.artifacts) if name in a]


def _corrupt(trans: np.ndarray, sub: Sequence[str], cfg: RealismConfig, words: tuple[int, ...],
             axes: tuple[np.ndarray, np.ndarray, float]) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """One spectrum's noise-free transients (K, n_sub, P) -> its averaged, corrupted rows (n_sub, P)
    and the record of what it carries (the scanner's noise is added afterwards, by the caller)."""
    time, ppm, lf = axes
    edited = "ON" in sub
    if edited:
        from SMART_MRS.support import interleave, undo_interleave

        fids = interleave(trans[:, sub.index("ON")], trans[:, sub.index("OFF")])
    else:
        fids = trans[:, 0].astype(np.complex128)
    scan = Scan(fids, time, ppm, lf, edited)
    coins = np.random.default_rng([*words, 0]).random(len(ARTIFACTS))
    record: dict[str, dict[str, Any]] = {}

    def run(stage: str) -> None:
        for j, (name, art) in enumerate(cfg.artifacts.items()):
            if art.STAGE == stage and coins[j] < art.scans:
                with _global_seed(_seed(*words, 1, j)):
                    record[name] = art.apply(scan, np.random.default_rng([*words, 2, j]))

    run("transients")
    if edited:
        on, off = undo_interleave(scan.fids)
        rows = {"ON": on.mean(axis=0), "OFF": off.mean(axis=0)}
        scan.fids = np.stack([rows[s] for s in sub])
    else:
        scan.fids = scan.fids.mean(axis=0, keepdims=True)
    run("average")
    return scan.fids, record


def build_realistic_set(cfg: RealismConfig, site: str = "", grid: CanonicalGrid | None = None) -> RealisticSet:
    """The site's set: cfg.spectra spectra split evenly over cfg.profiles (in that order), each a
    function of (cfg, cfg.seed, its profile and index).

    Artifacts act on the simulator's noise-free transients (a broadening applied to noisy transients
    would filter the noise too: a matched filter, not a poorer shim); the simulator's own noise of the
    same draw (`fixed={"snr": inf}` leaves every other draw unchanged) is added to the average after.
    """
    grid = grid or CanonicalGrid.from_config()
    axes = (np.arange(grid.points) / grid.bandwidth_hz, grid.ppm(), grid.spectrometer_mhz * 1e6)
    n_prof = len(cfg.profiles)
    counts = [cfg.spectra // n_prof + (i < cfg.spectra % n_prof) for i in range(n_prof)]
    spectra, records = [], []
    for p, (name, count) in enumerate(zip(cfg.profiles, counts)):
        if count == 0:
            continue
        sim = Simulator(replace(load_profile(name), n_transients=cfg.transients), grid, device="cpu")
        for c, start in enumerate(range(0, count, CHUNK)):
            n, seed = min(CHUNK, count - start), _seed(cfg.seed, p, c)
            clean = sim.simulate(n, seed=seed, fixed={"snr": math.inf})
            noisy = sim.simulate(n, seed=seed, normalise=False)
            scale = clean.truth["norm_scale"].numpy()[:, None, None]
            noise = noisy.fid.numpy() / scale - clean.fid.numpy()  # the draw's noise, on the clean scale
            trans = (clean.fid[:, None] if clean.transients is None else clean.transients).numpy()
            out = np.empty(clean.fid.shape, dtype=np.complex64)
            norm = np.empty(n)
            chunk_records = []
            for i in range(n):
                rows, record = _corrupt(trans[i], clean.sub, cfg, (cfg.seed, p, start + i), axes)
                rows = rows + noise[i]
                norm[i] = norm_factor(rows[0], grid)
                out[i] = rows / norm[i]
                chunk_records.append(record)
            truth = {**noisy.truth, "norm_scale": torch.from_numpy(scale[:, 0, 0] * norm)}
            done = replace(noisy, fid=torch.from_numpy(out), transients=None, truth=truth).to_spectra()
            for i, (spec, record) in enumerate(zip(done, chunk_records)):
                spec.provenance.source = f"realistic:{site or 'site'}:{name}:{cfg.seed}:{start + i}"
                spec.provenance.extra.update(site=site, artifacts=record)
                spectra.append(spec)
                records.append(record)
    return RealisticSet(site, cfg, spectra, records)


def site_set(site: str, overrides: Sequence[str] = (), grid: CanonicalGrid | None = None) -> RealisticSet:
    """configs/site/<site>.yaml's private in vivo-like set."""
    return build_realistic_set(site_realism(site, overrides), site, grid)


def write_realistic_set(rset: RealisticSet, out_dir: str | Path) -> list[Path]:
    """The set as NIfTI-MRS files (a site's data_dir: what its loader reads) with a JSON sidecar each
    (simulator truth and the artifacts carried)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, spec in enumerate(rset.spectra):
        prov = spec.provenance
        stem = out_dir / f"{rset.site or 'site'}_s{rset.config.seed}_{i:05d}"
        profile = prov.extra["profile"]
        _nifti(spec, prov.vendor, prov.sequence or "", prov.te_ms, profile).save(f"{stem}.nii.gz")
        sidecar = {"site": rset.site, "profile": profile, "index": i, "source": prov.source, "vendor": prov.vendor,
                   "sequence": prov.sequence, "te_ms": prov.te_ms, "sub": list(spec.sub),
                   "artifacts": prov.extra["artifacts"], "truth": prov.extra["truth"]}
        Path(f"{stem}.json").write_text(json.dumps(sidecar, indent=1))
        paths.append(Path(f"{stem}.nii.gz"))
    return paths


# --------------------------------------------------------------------------- telling a set from the shared stream
FEATURES = ("log_snr", "naa_fwhm_hz", "naa_sharpness", "naa_dispersion", "lipid_ratio", "log_upfield",
            "log_downfield")


def spectral_features(spectra: Sequence[Spectrum]) -> np.ndarray:
    """(n, len(FEATURES)) statistics of the first row (OFF or the average) on the canonical grid: the
    QC measures (data/quality.py: SNR, NAA linewidth), NAA's height over its +-15-bin area, the share of
its line left in the imaginary part once phased at its peak (a distorted lineshape: eddy currents,
motion, drift), lipid band
    (1.1-1.6 ppm) over metabolite band (1.8-4.0 ppm) mean magnitude, and the mean magnitude in -2-0 ppm
    and 5.5-8.5 ppm (baselines, echoes) over the noise level."""
    def band(ppm: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return (ppm >= lo) & (ppm <= hi)

    out = []
    for spec in spectra:
        s = np.fft.fftshift(np.fft.fft(spec.fid[0]))
        mag, ppm = np.abs(s), spec.ppm_axis()
        q = measure(spec)
        naa = np.flatnonzero(band(ppm, 1.9, 2.1))
        peak = int(naa[np.argmax(mag[naa])])
        sd = float(np.std(np.diff(s[band(ppm, -2.0, 0.0)].real)) / math.sqrt(2.0))
        line = s[peak - 15:peak + 16] * np.exp(-1j * np.angle(s[peak]))
        out.append([math.log(max(q.snr, 1e-6)), q.naa_fwhm_hz, mag[peak] / mag[peak - 15:peak + 16].sum(),
                    abs(line.imag.sum()) / abs(line.real.sum()),
                    mag[band(ppm, 1.1, 1.6)].mean() / mag[band(ppm, 1.8, 4.0)].mean(),
                    math.log(mag[band(ppm, -2.0, 0.0)].mean() / sd), math.log(mag[band(ppm, 5.5, 8.5)].mean() / sd)])
    return np.asarray(out, dtype=np.float64)


def detector_auc(a: np.ndarray, b: np.ndarray, seed: int = 0, ridge: float = 1e-3) -> float:
    """How well a linear detector (Fisher's discriminant on standardised features) fitted on a random
    half of two sets of feature rows tells them apart on the other half: ROC AUC (0.5: not at all)."""
    x = np.concatenate([a, b])
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    y = np.r_[np.ones(len(a)), np.zeros(len(b))].astype(bool)
    idx = np.random.default_rng(seed).permutation(len(x))
    train, test = idx[: len(x) // 2], idx[len(x) // 2:]
    xt, yt = x[train], y[train]
    w = np.linalg.solve(np.cov(xt.T) + ridge * np.eye(x.shape[1]), xt[yt].mean(0) - xt[~yt].mean(0))
    score, truth = x[test] @ w, y[test]
    ranks = np.empty(len(score))
    ranks[np.argsort(score)] = np.arange(1, len(score) + 1)
    n1, n0 = int(truth.sum()), int((~truth).sum())
    return float((ranks[truth].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def shared_stream_sample(cfg: RealismConfig, seed: int, grid: CanonicalGrid | None = None) -> list[Spectrum]:
    """As many spectra of the shared simulated stream (the site's profiles as the stream draws them:
    one transient, no artifacts) as the site's set holds, split over the profiles the same way."""
    grid = grid or CanonicalGrid.from_config()
    n_prof = len(cfg.profiles)
    out: list[Spectrum] = []
    for p, name in enumerate(cfg.profiles):
        count = cfg.spectra // n_prof + (p < cfg.spectra % n_prof)
        if count:
            out += Simulator(name, grid, device="cpu").simulate(count, seed=_seed(seed, p)).to_spectra()
    return out


# --------------------------------------------------------------------------- the QC gate on a set
def qc_flags(rset: RealisticSet, gate: QualityConfig | None = None,
             grid: CanonicalGrid | None = None) -> list[tuple[Quality | None, str | None]]:
    """The loaders' gate (data.quality) on each spectrum, after to_canonical as a site's loader does
    (residual water removed): its measures and the reason it is left out, or None."""
    gate = gate or QualityConfig.from_config()
    grid = grid or CanonicalGrid.from_config()
    out: list[tuple[Quality | None, str | None]] = []
    for spec in rset.spectra:
        try:
            q = measure(to_canonical(spec, grid))
            out.append((q, q.problem(gate)))
        except (ValueError, MRSDataError) as exc:
            out.append((None, str(exc).splitlines()[0]))
    return out


def qc_report(rset: RealisticSet, gate: QualityConfig | None = None,
              grid: CanonicalGrid | None = None) -> list[dict[str, Any]]:
    """How many spectra the QC gate flags, per artifact (a spectrum with several counts under each;
    `none`: spectra with no artifact; `all`: the whole set), with the median SNR and NAA linewidth."""
    flags = qc_flags(rset, gate, grid)
    groups = {name: rset.carrying(name) for name in rset.config.active}
    groups["none"] = [i for i, a in enumerate(rset.artifacts) if not a]
    groups["all"] = list(range(len(rset)))
    rows = []
    for name, idx in groups.items():
        flagged = [i for i in idx if flags[i][1] is not None]
        qs = [flags[i][0] for i in idx if flags[i][0] is not None]
        rows.append({"site": rset.site, "artifact": name, "spectra": len(idx), "flagged": len(flagged),
                     "share": round(len(flagged) / len(idx), 3) if idx else None,
                     "median_snr": round(float(np.median([q.snr for q in qs])), 1) if qs else None,
                     "median_naa_fwhm_hz": round(float(np.median([q.naa_fwhm_hz for q in qs])), 1) if qs else None})
    return rows


def qc_table(rows: Sequence[dict[str, Any]]) -> str:
    """qc_report rows (one or more sites) as a markdown table."""
    lines = ["| site | artifact | spectra | flagged by the QC gate | median SNR | median NAA FWHM (Hz) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        share = "" if r["share"] is None else f" ({100 * r['share']:.0f} %)"
        snr, fwhm = ("-" if v is None else v for v in (r["median_snr"], r["median_naa_fwhm_hz"]))
        lines.append(f"| {r['site']} | {r['artifact']} | {r['spectra']} | {r['flagged']}{share} | {snr} | {fwhm} |")
    return "\n".join(lines)


def realism_sites() -> list[str]:
    """The configured sites (configs/site/*.yaml); each must have a realism profile."""
    return config_names("site")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mrsfm_model.data.realism SITE OUT [overrides]`: write a site's set as NIfTI-MRS and
    print the QC gate's counts per artifact."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mrsfm_model.data.realism", description=main.__doc__)
    ap.add_argument("site")
    ap.add_argument("out")
    ap.add_argument("overrides", nargs="*", help="Hydra words, e.g. site.realism.spectra=50")
    args = ap.parse_args(argv)
    try:
        rset = site_set(args.site, args.overrides)
    except ValueError as exc:
        ap.exit(2, f"{ap.prog}: {exc}\n")
    paths = write_realistic_set(rset, args.out)
    print(f"{len(paths)} spectra of site {args.site} in {args.out}")
    print(qc_table(qc_report(rset)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
