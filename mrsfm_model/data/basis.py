"""Metabolite basis sets (one FID per metabolite) read from three formats onto the canonical grid.

Why: simulation must carry real vendor differences (editing and refocusing pulses), and those
live in vendor-specific basis sets written by different tools with different conventions. Each
reader below turns its format into FIDs in the `Spectrum` convention (spectrum =
fftshift(fft(fid)), ppm rising with index) plus the ppm of the receiver frequency; one common
step then moves them to 4.65 ppm, resamples them onto the grid and puts them on one amplitude
scale. Conventions found in the shipped files (checked by tests: NAA 2.01, Cr 3.03 ppm):

- vendor HDF5 (Q-MRS, Osprey-made): FIDs already in our sign; receiver at 3.0 ppm (the file's
  `ppm_array`); `fids_DIFF` is ON - OFF (NAA nearly cancels, GABA 3.0 ppm positive), so
  ON = OFF + DIFF. `MM3co` (co-edited 3.0 ppm macromolecule) exists in DIFF only.
- FID-A .mat: spectrum = fftshift(ifft(fid)) with a *descending* ppm axis, which is the same
  as our convention: no conjugation (it would be needed with an ascending axis). Receiver at
  3.0 ppm (the file's `ppm` at the zero-frequency bin).
- LCModel .BASIS (Osprey `io_writelcmBASIS`): stores the spectrum fft(conj(fid)) in FFT order
  (zero frequency first) after moving the receiver to 4.68 ppm, so fid = conj(ifft(data)).
  HZPPPM may be 123.2 MHz (Siemens 2.89 T); resampling is in ppm, so that is absorbed.

Scale: amplitudes within a file are kept; each file is scaled so that 1 mM of Cr gives a
3.03 ppm singlet of unit height at 6 Hz (Gaussian) linewidth (an area criterion, so the
files' own intrinsic linewidths do not matter). Concentrations in mM then give comparable
spectra across formats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mrsfm_model.data.canonical import CanonicalGrid, resample_fids
from mrsfm_model.data.spectrum import GAMMA_1H_MHZ_PER_T, PPM_REFERENCE, normalise_vendor
from mrsfm_model.errors import MRSDataError

UNIT_FWHM_HZ = 6.0  # linewidth at which 1 mM Cr's CH3 singlet has unit height
CR_WINDOW_PPM = (2.9, 3.15)
OSPREY_LCMODEL_REF_PPM = 4.68  # Osprey writes .BASIS files with the receiver at 4.68 ppm
LCMODEL_REF_PPM = 4.65

# Common vocabulary: lower-case source spelling -> our name (unlisted names are kept as they are).
ALIASES = {
    "ins": "mI", "mi": "mI", "myo": "mI", "myo-inositol": "mI", "minositol": "mI",
    "si": "Scyllo", "sins": "Scyllo", "scyllo": "Scyllo", "scyllo-inositol": "Scyllo",
    "tyros": "Tyr", "tyr": "Tyr", "phenyl": "Phe", "phe": "Phe",
    "naa": "NAA", "naag": "NAAG", "cr": "Cr", "pcr": "PCr", "gpc": "GPC", "pch": "PCh",
    "glu": "Glu", "gln": "Gln", "gaba": "GABA", "tau": "Tau", "gsh": "GSH", "lac": "Lac",
    "asp": "Asp", "asc": "Asc", "pe": "PE", "glc": "Glc", "gly": "Gly", "ala": "Ala",
    "ch": "Ch", "cho": "Ch", "h2o": "H2O", "water": "H2O",
}
MM_PREFIXES = ("MM", "Lip")  # macromolecule and lipid components
NOT_METABOLITES = ("H2O", "Ref0ppm")  # reference compounds in some basis sets, never simulated


def normalise_name(name: str) -> str:
    """One spelling per metabolite across basis formats ("Ins" -> "mI", "sI" -> "Scyllo")."""
    name = name.strip()
    return ALIASES.get(name.lower(), name)


def is_macromolecule(name: str) -> bool:
    return name.startswith(MM_PREFIXES)


def is_metabolite(name: str) -> bool:
    """Fitting helpers ("-CrCH2"), reference compounds and MM/lipids are not metabolites."""
    return not (is_macromolecule(name) or name in NOT_METABOLITES or name.startswith("-"))


@dataclass
class Basis:
    """Basis FIDs on the canonical grid: `fids[sub]` is complex (n_names, points), rows = `names`.

    `sub` is ("OFF", "ON") for MEGA-PRESS and ("avg",) for unedited sequences.
    """

    names: list[str]
    fids: dict[str, np.ndarray]
    vendor: str | None
    sequence: str
    te_ms: float | None
    source: str
    unit_scale: float = 1.0  # factor applied to the file's amplitudes
    notes: dict = field(default_factory=dict)

    @property
    def sub(self) -> tuple[str, ...]:
        return tuple(self.fids)

    @property
    def metabolites(self) -> list[str]:
        return [n for n in self.names if is_metabolite(n)]

    @property
    def macromolecules(self) -> list[str]:
        return [n for n in self.names if is_macromolecule(n)]

    def index(self, name: str) -> int:
        return self.names.index(name)

    def stack(self, names: list[str] | None = None) -> np.ndarray:
        """(len(names), n_sub, points) complex array, rows in `names` order (default: all)."""
        rows = [self.index(n) for n in (self.names if names is None else names)]
        return np.stack([self.fids[s][rows] for s in self.sub], axis=1)


@dataclass
class _Raw:
    """A basis as read: FIDs in our sign convention on the file's own grid."""

    names: list[str]
    fids: dict[str, np.ndarray]  # sub -> (n_names, n_points)
    bandwidth_hz: float
    spectrometer_mhz: float
    ref_ppm: float  # ppm of the receiver (zero) frequency
    vendor: str | None
    sequence: str
    te_ms: float | None


# --------------------------------------------------------------------------- readers
def _sequence_name(raw: str | None, edited: bool) -> str:
    if edited or (raw and "mega" in raw.lower()):
        return "MEGA-PRESS"
    return "PRESS" if not raw or "press" in raw.lower() else str(raw).upper()


def _zero_freq_ppm(ppm: np.ndarray) -> float:
    """ppm the file gives its zero-frequency bin (index n/2 of an fftshift-ordered axis)."""
    return float(np.asarray(ppm, dtype=float).ravel()[len(ppm) // 2])


def _read_h5(path: Path) -> _Raw:
    import h5py

    def text(x) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)

    with h5py.File(path, "r") as f:
        need = ("fids_OFF", "fids_DIFF", "metab_names_OFF", "metab_names_DIFF", "ppm_array")
        missing = [k for k in need if k not in f]
        if missing:
            raise MRSDataError(path, f"HDF5 basis lacks {', '.join(missing)}")
        def names_of(key: str) -> list[str]:
            return [text(n) for n in f[key][()]] if key in f else []

        mm_off = names_of("MM_names_OFF")
        cols = {}
        for sub in ("OFF", "DIFF"):
            fids = np.asarray(f[f"fids_{sub}"][()]).T  # (names, points)
            names = names_of(f"metab_names_{sub}") + (mm_off if sub == "OFF" else [])
            if sub == "DIFF" and fids.shape[0] == len(names) + len(mm_off) + len(names_of("MM_names_DIFF")):
                names += mm_off  # Q-MRS files: DIFF columns = metabolites, OFF's MMs, DIFF's MMs
            names += names_of("MM_names_DIFF") if sub == "DIFF" else []
            if fids.shape[0] != len(names):
                raise MRSDataError(path, f"fids_{sub} has {fids.shape[0]} columns for {len(names)} names")
            cols[sub] = dict(zip((normalise_name(n) for n in names), fids))
        dwell = float(f["dwell_time"][()]) if "dwell_time" in f else 1.0 / float(f["spectral_width"][()])
        bo = float(f["Bo"][()]) if "Bo" in f else 3.0
        ref = _zero_freq_ppm(f["ppm_array"][()])
        te = float(f["te"][()]) if "te" in f else None
        vendor = normalise_vendor(text(f["vendor"][()])) if "vendor" in f else None
    names = list(dict.fromkeys([*cols["OFF"], *cols["DIFF"]]))
    n_pts = next(iter(cols["OFF"].values())).shape[-1]
    off = np.stack([cols["OFF"].get(n, np.zeros(n_pts, complex)) for n in names])
    diff = np.stack([cols["DIFF"].get(n, np.zeros(n_pts, complex)) for n in names])
    return _Raw(names, {"OFF": off, "ON": off + diff}, 1.0 / dwell, bo * GAMMA_1H_MHZ_PER_T, ref,
                vendor, "MEGA-PRESS", te)


def _read_fida_file(path: Path) -> tuple[np.ndarray, float, float, float, dict]:
    """One FID-A struct -> (fid in our convention, bandwidth, MHz, receiver ppm, the struct)."""
    from scipy.io import loadmat

    d = loadmat(path, squeeze_me=True, struct_as_record=False)
    if "fids" not in d:
        d = next((v.__dict__ for v in d.values() if hasattr(v, "fids")), d)  # saved as one struct
    for key in ("fids", "spectralwidth", "ppm"):
        if key not in d:
            raise MRSDataError(path, f"FID-A file lacks '{key}'")
    fid, ppm = np.asarray(d["fids"], dtype=complex).ravel(), np.asarray(d["ppm"], dtype=float).ravel()
    mhz = float(d["txfrq"]) / 1e6 if "txfrq" in d else float(d.get("Bo", 3.0)) * GAMMA_1H_MHZ_PER_T
    # FID-A: spectrum = fftshift(ifft(fid)). With ppm falling with index that equals our
    # fftshift(fft(fid)) with ppm rising; with ppm rising it is the mirror image: conjugate.
    if ppm[0] < ppm[-1]:
        fid = np.conj(fid)
    return fid, float(d["spectralwidth"]), mhz, _zero_freq_ppm(ppm), d


def _read_fida_folder(path: Path) -> _Raw:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".mat")
    if not files:
        raise MRSDataError(path, "folder holds no FID-A .mat basis files")
    table: dict[str, dict[str, np.ndarray]] = {}
    meta = None
    for p in files:
        stem, _, tag = p.stem.rpartition("_")
        sub = tag.upper() if tag.upper() in ("ON", "OFF") else "avg"
        name = normalise_name(stem if sub != "avg" else p.stem)
        fid, bw, mhz, ref, d = _read_fida_file(p)
        if meta is None:
            meta = (bw, mhz, ref, len(fid), d)
        elif (bw, len(fid)) != (meta[0], meta[3]) or abs(ref - meta[2]) > 1e-3:
            raise MRSDataError(p, "sampling differs from the other files of this basis")
        table.setdefault(name, {})[sub] = fid
    subs = sorted({s for v in table.values() for s in v}, key=("OFF", "ON", "avg").index)
    if subs not in (["OFF", "ON"], ["avg"]):
        raise MRSDataError(path, f"mixed edit conditions {subs}: need *_ON/*_OFF pairs or unedited files")
    incomplete = [n for n, v in table.items() if len(v) != len(subs)]
    if incomplete:
        raise MRSDataError(path, f"missing ON or OFF file for {', '.join(incomplete)}")
    names = list(table)
    bw, mhz, ref, _, d = meta
    fids = {s: np.stack([table[n][s] for n in names]) for s in subs}
    edited = subs == ["OFF", "ON"]
    te = float(d["te"]) if "te" in d else None
    return _Raw(names, fids, bw, mhz, ref, None, _sequence_name(str(d.get("seq", "")), edited), te)


def _namelist_value(text: str, key: str) -> str | None:
    m = re.search(rf"\b{key}\s*=\s*('([^']*)'|[^,\s$]+)", text)
    return None if m is None else (m.group(2) if m.group(2) is not None else m.group(1))


def _read_lcmodel(path: Path) -> _Raw:
    text = path.read_text(errors="replace")
    head = re.split(r"\$BASIS\s", text, maxsplit=1)[0]
    values = {k: _namelist_value(head, k) for k in ("HZPPPM", "BADELT", "NDATAB", "ECHOT", "SEQ", "IDBASI")}
    for key in ("HZPPPM", "BADELT", "NDATAB"):
        if values[key] is None:
            raise MRSDataError(path, f"LCModel .BASIS header lacks {key}")
    mhz, dwell, n = float(values["HZPPPM"]), float(values["BADELT"]), int(values["NDATAB"])
    names, rows = [], []
    blocks = re.finditer(r"\$BASIS\s(.*?)\$END(.*?)(?=\$NMUSED|\$BASIS\s|\Z)", text, re.S)
    for m in blocks:
        name = _namelist_value(m.group(1), "METABO") or _namelist_value(m.group(1), "ID")
        try:
            nums = np.array(m.group(2).replace("D", "E").replace("d", "e").split(), dtype=float)
        except ValueError:
            raise MRSDataError(path, f"basis block {name!r}: unreadable numbers (file truncated?)") from None
        if name is None or nums.size != 2 * n:
            raise MRSDataError(path, f"basis block {name!r} has {nums.size // 2} points, header says {n}")
        names.append(normalise_name(name))
        rows.append(np.conj(np.fft.ifft(nums[0::2] + 1j * nums[1::2])))  # stored: fft(conj(fid))
    if not names:
        raise MRSDataError(path, "no $BASIS blocks found")
    idbasi = values["IDBASI"] or ""
    ref = OSPREY_LCMODEL_REF_PPM if "osprey" in idbasi.lower() else LCMODEL_REF_PPM
    te = float(values["ECHOT"]) if values["ECHOT"] else None
    return _Raw(names, {"avg": np.stack(rows)}, 1.0 / dwell, mhz, ref, normalise_vendor(idbasi),
                _sequence_name(values["SEQ"], False), te)


def _read(path: Path) -> _Raw:
    if path.is_dir():
        return _read_fida_folder(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return _read_h5(path)
    if suffix == ".basis":
        return _read_lcmodel(path)
    raise MRSDataError(path, "unknown basis format (expected .h5, .BASIS or a folder of FID-A .mat files)")


# --------------------------------------------------------------------------- onto the grid
def _unit_scale(fid: np.ndarray, grid: CanonicalGrid) -> float:
    """Factor giving Cr's 3.03 ppm singlet (1 mM) unit height at UNIT_FWHM_HZ Gaussian width."""
    spec = np.fft.fftshift(np.fft.fft(fid)).real
    ppm = grid.ppm()
    area = float(spec[(ppm >= CR_WINDOW_PPM[0]) & (ppm <= CR_WINDOW_PPM[1])].sum())
    unit_area = 1.0645 * UNIT_FWHM_HZ / (grid.bandwidth_hz / grid.points)  # Gaussian, in bins
    return unit_area / area


def _on_grid(raw: _Raw, grid: CanonicalGrid, path: Path) -> Basis:
    flat = replace(grid, fill_noise=False)  # a basis is noise-free: never fill bands with noise
    n_src = next(iter(raw.fids.values())).shape[-1]
    t = np.arange(n_src) / raw.bandwidth_hz
    to_water = np.exp(2j * np.pi * (raw.ref_ppm - PPM_REFERENCE) * raw.spectrometer_mhz * t)
    fids = {s: resample_fids(x * to_water, raw.bandwidth_hz, raw.spectrometer_mhz, flat)
            for s, x in raw.fids.items()}
    cr = next((n for n in ("Cr", "tCr", "Cr+PCr", "PCr") if n in raw.names), None)
    if cr is None:
        raise MRSDataError(path, "basis has no creatine (Cr/PCr), needed to fix its amplitude scale")
    scale = _unit_scale(next(iter(fids.values()))[raw.names.index(cr)], grid)
    if not np.isfinite(scale) or scale <= 0:
        raise MRSDataError(path, "creatine basis spectrum is empty or inverted near 3.03 ppm")
    return Basis(
        names=list(raw.names),
        fids={s: (x * scale).astype(np.complex64) for s, x in fids.items()},
        vendor=raw.vendor,
        sequence=raw.sequence,
        te_ms=raw.te_ms,
        source=str(path),
        unit_scale=float(scale),
        notes={"source_mhz": raw.spectrometer_mhz, "source_bandwidth_hz": raw.bandwidth_hz,
               "source_points": n_src, "source_ref_ppm": raw.ref_ppm},
    )


def load_basis(path: str | Path, grid: CanonicalGrid) -> Basis:
    """Read a basis set (.h5, LCModel .BASIS, or a folder of FID-A .mat) onto `grid`."""
    path = Path(path)
    if not path.exists():
        raise MRSDataError(path, "basis set does not exist")
    try:
        raw = _read(path)
        if len(set(raw.names)) != len(raw.names):
            raise MRSDataError(path, f"duplicate metabolite names {raw.names}")
        if not all(np.isfinite(x).all() and np.any(x) for x in raw.fids.values()):
            raise MRSDataError(path, "basis FIDs are empty or not finite")
        return _on_grid(raw, grid, path)
    except MRSDataError:
        raise
    except Exception as exc:  # h5py/scipy/parse errors are many; report one readable line
        raise MRSDataError(path, f"not a readable basis set ({type(exc).__name__}: {exc})") from None


__all__ = ["Basis", "load_basis", "normalise_name", "is_metabolite", "is_macromolecule"]
