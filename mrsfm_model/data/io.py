"""Read real MRS files into `Spectrum` records (on their native grid) and convert them to NIfTI-MRS.

Why one module: every vendor format goes through spec2nii's own Python readers, which all return
NIfTI-MRS objects, so a single function (`load_nifti_mrs_image`) does coil combination, averaging
and edit-condition ordering for every source alike. Every failure becomes one `MRSDataError` with
a short reason, so a command line or a dataset can report it and go on.

Sign convention: NIfTI-MRS files store the FID so that FSL-MRS (and `NIFTI_MRS[...]`) conjugate
it on read; with the stored data, fftshift(fft(fid)) puts NAA at 7.3 ppm (mirrored about water).
`Spectrum` wants fftshift(fft(fid)) with ppm rising with index, so readers here use the conjugate
of the stored data (checked: NAA at 2.0 ppm for the Philips, Siemens RDA/DICOM and 7 T files).
"""

from __future__ import annotations

import contextlib
import importlib
import io as _stdio
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mrsfm_model.data.spectrum import PPM_REFERENCE, Provenance, Spectrum, normalise_vendor, ppm_axis
from mrsfm_model.errors import MRSDataError

SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".nii.gz", ".nii", ".sdat", ".rda", ".ima", ".dcm", ".dat", ".7", ".data", ".list",
)
SIDECAR_SUFFIXES = (".spar", ".json", ".list")  # never loaded on their own by load_folder
GAMMA_1H_MHZ_PER_T = 42.577
TRANSIENT_DIMS = ("DIM_DYN", "DIM_MEAS", "DIM_PHASE_CYCLE")  # plus DIM_USER_*: repeats, averaged
UNSUPPORTED_DIMS = ("DIM_ISIS",)  # un-combined ISIS scans are not localised on their own
MIN_POINTS = 16
MRS_SOP_CLASSES = {  # what spec2nii's DICOM readers accept as spectroscopy
    "1.3.12.2.1107.5.9.1": "Siemens CSA non-image", "1.2.840.10008.5.1.4.1.1.4.2": "MR Spectroscopy",
    "1.3.46.670589.11.0.0.12.1": "Philips private MR spectrum",
}


# --------------------------------------------------------------------------- small helpers
def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(_suffix(path))]


def _short(exc: BaseException, path: Path | None = None) -> str:
    """One readable line from a library exception (type + first line, bounded, path shortened)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if path is not None:
        msg = msg.replace(str(path), path.name)
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """spec2nii and mapvbvd print progress and warn freely; keep library chatter off the console."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(_stdio.StringIO()):
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            yield


def _lib(module: str, *names: str) -> Any:
    """Import spec2nii/mapvbvd lazily (they are slow to import and warn at import time)."""
    with _quiet():
        mod = importlib.import_module(module)
    found = [getattr(mod, n) for n in names]
    return found[0] if len(found) == 1 else found


def _call(path: Path, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run a library reader; any exception becomes MRSDataError(path, "<what> (<reason>)").

    The library exception is dropped inside `_quiet`, so the file handles its traceback holds
    are closed there too (no ResourceWarning leaks out) and no library traceback is chained.
    """
    with _quiet():
        try:
            return fn(*args, **kwargs)
        except MRSDataError:
            raise
        except MemoryError:
            problem = "header asks for more memory than is available"
        except Exception as exc:  # library errors are many and undocumented; report, never crash
            problem = _short(exc, path)
    raise MRSDataError(path, f"{what} ({problem})")


def _sibling(path: Path, suffix: str) -> Path | None:
    """The file next to `path` with the same stem and `suffix` in any letter case."""
    exact = path.parent / (_stem(path) + suffix)
    if exact.is_file():
        return exact
    return _listing(path.parent).get((_stem(path) + suffix).lower())


def _hdr(img: Any, key: str) -> Any:
    try:
        return img.hdr_ext[key]
    except Exception:
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


# --------------------------------------------------------------------------- vendor readers
# Each reader returns spec2nii's (images, names); the first non-reference image is the metabolite.
def _read_nifti(path: Path) -> tuple[list, list[str]]:
    NIFTI_MRS, NotNIFTI_MRS = _lib("nifti_mrs.nifti_mrs", "NIFTI_MRS", "NotNIFTI_MRS")

    try:
        with _quiet():
            img = NIFTI_MRS(str(path))
            np.asarray(img.image.data)  # force the (lazy) read so truncation shows here
    except NotNIFTI_MRS as exc:
        raise MRSDataError(path, f"a NIfTI image but not NIfTI-MRS ({exc})") from None
    except Exception as exc:
        if type(exc).__name__ == "headerExtensionError":
            raise MRSDataError(path, f"invalid NIfTI-MRS header extension ({_short(exc, path)})") from None
        raise MRSDataError(path, f"not a readable NIfTI file: corrupt or truncated ({_short(exc, path)})") \
            from None
    return [img], [_stem(path)]


def _read_sdat(path: Path) -> tuple[list, list[str]]:
    read_sdat_spar_pair, read_spar = _lib("spec2nii.Philips.philips", "read_sdat_spar_pair", "read_spar")

    spar = _sibling(path, ".spar")
    if spar is None:
        raise MRSDataError(path, f"Philips SDAT without its SPAR header (expected {_stem(path)}.SPAR next to it)")
    params = _call(path, f"its SPAR header {spar.name} cannot be parsed", read_spar, spar)
    need = ("samples", "rows", "sample_frequency", "synthesizer_frequency")
    missing = [k for k in need if not isinstance(params.get(k), (int, float)) or params.get(k) <= 0]
    if missing:
        raise MRSDataError(path, f"its SPAR header {spar.name} lacks valid {', '.join(missing)}")
    nucleus = str(params.get("nucleus", "1H")).strip()
    if nucleus.upper() != "1H":
        raise MRSDataError(path, f"nucleus {nucleus} is not supported (1H only)")
    expected, size = 8 * int(params["samples"]) * int(params["rows"]), path.stat().st_size
    if size != expected:
        raise MRSDataError(path, f"SDAT has {size} bytes but its SPAR header implies {expected} "
                                 "(truncated or mismatched)")
    # spec2nii tags a second SDAT row DIM_DYN; in an edited scan the two rows are the edit conditions
    scan = str(params.get("scan_id", ""))
    edited = int(params["rows"]) == 2 and re.search(r"mega|edit|gaba|gsh|j-?diff", scan, re.I)
    tags = ["DIM_EDIT" if edited else None, None, None]
    return _call(path, "not a readable Philips SDAT/SPAR pair", read_sdat_spar_pair, path, spar, tags=tags)


def _read_rda(path: Path) -> tuple[list, list[str]]:
    convert_rda = _lib("spec2nii.Siemens.rda", "convert_rda")

    raw = path.read_bytes()
    if not raw.lstrip().startswith(b">>> Begin of header <<<"):
        raise MRSDataError(path, "not a Siemens RDA file (no '>>> Begin of header <<<' line)")
    end = raw.find(b">>> End of header <<<")
    if end < 0:
        raise MRSDataError(path, "RDA header has no end marker (file truncated?)")
    header = raw[:end].decode("latin-1")

    def field(name: str) -> int:
        m = re.search(rf"^{re.escape(name)}: *(\d+)", header, re.M)
        if not m:
            raise MRSDataError(path, f"RDA header lacks {name}")
        return int(m.group(1))

    n_vox = field("CSIMatrixSize[0]") * field("CSIMatrixSize[1]") * field("CSIMatrixSize[2]")
    if n_vox > 1:
        raise MRSDataError(path, f"MRSI ({n_vox} voxels) is not supported")
    expected = 16 * field("VectorSize") * max(n_vox, 1)
    data_bytes = len(raw) - (raw.find(b"\n", end) + 1)
    if data_bytes != expected:
        raise MRSDataError(path, f"RDA holds {data_bytes} data bytes but its header implies {expected} (truncated?)")
    return _call(path, "RDA header could not be parsed", convert_rda, path, None, False)


def _read_dicom(path: Path) -> tuple[list, list[str]]:
    import pydicom

    ds = None
    for force in (False, True):  # some older Siemens exports lack the 128-byte preamble
        try:
            with _quiet():
                ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=force)
                sop = str(ds.get("SOPClassUID", ""))
            break
        except Exception:
            ds = None
    if ds is None or (not sop and "Manufacturer" not in ds):
        raise MRSDataError(path, "not a DICOM file (no readable DICOM header)")
    if sop not in MRS_SOP_CLASSES:
        raise MRSDataError(path, f"a DICOM file without MR spectroscopy data (SOP class {sop or 'missing'})")
    vendor = normalise_vendor(str(ds.get("Manufacturer", "")))
    if vendor not in ("Siemens", "Philips"):
        maker = ds.get("Manufacturer", "an unknown maker")
        raise MRSDataError(path, f"DICOM from {maker!r} is not supported (Siemens and Philips MRS DICOM only)")
    multi_file_dicom = _lib(f"spec2nii.{vendor}.{'dicomfunctions' if vendor == 'Siemens' else 'philips_dcm'}",
                            "multi_file_dicom")
    return _call(path, "DICOM spectroscopy data could not be read", multi_file_dicom, [path], None, None, False)


def _read_twix(path: Path) -> tuple[list, list[str]]:
    mapVBVD = _lib("mapvbvd", "mapVBVD")
    process_twix = _lib("spec2nii.Siemens.twixfunctions", "process_twix")

    head = np.fromfile(path, dtype="<u4", count=2)
    size = path.stat().st_size
    if head.size < 2 or not ((head[0] < 10000 and 0 < head[1] <= 64) or 0 < head[0] < size):
        raise MRSDataError(path, "not a Siemens twix (.dat) raw-data file (implausible header)")
    twix = _call(path, "not a readable Siemens twix (.dat) file", mapVBVD, str(path), quiet=True)
    if isinstance(twix, list):  # VD/VE multi-raid: the last measurement is the scan itself
        twix = twix[-1]
    overrides = {"dims": (None, None, None), "tags": (None, None, None)}
    return _call(path, "Siemens twix data could not be converted", process_twix,
                 twix, None, path.name, "image", overrides, quiet=True)


def _read_pfile(path: Path) -> tuple[list, list[str]]:
    read_pfile = _lib("spec2nii.GE.ge_pfile", "read_pfile")

    return _call(path, "not a readable GE P-file", read_pfile, path, None)


def _read_data_list(path: Path) -> tuple[list, list[str]]:
    read_data_list_pair = _lib("spec2nii.Philips.philips_data_list", "read_data_list_pair")

    if _suffix(path) == ".list":
        path = _sibling(path, ".data") or path.with_suffix(".data")
    lst, aux = _sibling(path, ".list"), _sibling(path, ".spar")
    if not path.is_file() or lst is None:
        raise MRSDataError(path, "Philips data/list needs both the .data and the .list file")
    if aux is None:
        raise MRSDataError(path, f"Philips data/list needs its SPAR header ({_stem(path)}.SPAR) next to it")
    return _call(path, "not a readable Philips data/list pair", read_data_list_pair, path, lst, aux)


_READERS: dict[str, Callable[[Path], tuple[list, list[str]]]] = {
    ".nii.gz": _read_nifti, ".nii": _read_nifti, ".sdat": _read_sdat, ".rda": _read_rda,
    ".ima": _read_dicom, ".dcm": _read_dicom, ".dat": _read_twix, ".7": _read_pfile,
    ".data": _read_data_list, ".list": _read_data_list,
}


def _read_images(path: Path) -> tuple[list, list[str]]:
    """Check the path, then run the reader its suffix names."""
    if not path.exists():
        raise MRSDataError(path, "file does not exist")
    if path.is_dir():
        raise MRSDataError(path, "is a directory, not a file")
    suffix = _suffix(path)
    if suffix not in _READERS:
        raise MRSDataError(path, f"unsupported file type {suffix or '(no suffix)'!r}; "
                                 f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise MRSDataError(path, "file is empty")
    images, names = _READERS[suffix](path)
    if not images:
        raise MRSDataError(path, "the file holds no spectra")
    return list(images), [str(n) for n in names]


def _is_reference_name(name: str) -> bool:
    low = name.lower()
    return bool(re.search(r"ref|wref|water|noi|noise|std_1", low))


def _split_outputs(images: list, names: list[str]) -> tuple[Any, Any | None]:
    """Metabolite image and (integrated) water reference image among a reader's outputs."""
    if len(images) == 1:
        return images[0], None
    main = next((i for i, n in zip(images, names) if not _is_reference_name(n)), images[0])
    ref = next((i for i, n in zip(images, names) if re.search(r"ref|std_1", n.lower()) and i is not main), None)
    return main, ref


# --------------------------------------------------------------------------- NIfTI-MRS -> Spectrum
def _as_block(img: Any, source: str) -> tuple[np.ndarray, list[str], float, float]:
    """Validated data in our convention: (higher dims..., points), dim tags, bandwidth, MHz."""
    try:
        data = np.asarray(img.image.data)
        dwell, mhz, nucleus = float(img.dwelltime), _number(img.spectrometer_frequency), img.nucleus
        tags_all = list(img.dim_tags)
    except Exception as exc:
        raise MRSDataError(source, f"NIfTI-MRS header or data unreadable ({_short(exc)})") from None
    nucleus = str(nucleus[0] if isinstance(nucleus, (list, tuple)) and nucleus else nucleus)
    if nucleus.upper() != "1H":
        raise MRSDataError(source, f"nucleus {nucleus} is not supported (1H only)")
    if data.ndim < 4:
        raise MRSDataError(source, f"data have {data.ndim} dimensions; NIfTI-MRS needs x, y, z, time")
    n_vox = int(np.prod(data.shape[:3]))
    if n_vox > 1:
        raise MRSDataError(source, f"MRSI ({n_vox} voxels) is not supported")
    if not np.iscomplexobj(data):
        raise MRSDataError(source, "data are not complex-valued")
    if not (np.isfinite(dwell) and dwell > 0) or mhz is None or mhz <= 0:
        raise MRSDataError(source, "invalid dwell time or spectrometer frequency in the header")
    if data.shape[3] < MIN_POINTS:
        raise MRSDataError(source, f"only {data.shape[3]} time points")
    if np.isnan(data).any():
        raise MRSDataError(source, "data contain NaN values")
    if np.isinf(data).any():
        raise MRSDataError(source, "data contain Inf values")
    if not np.any(data):
        raise MRSDataError(source, "data are all zero")
    tags = [tags_all[i] if i < len(tags_all) and tags_all[i] else "DIM_UNKNOWN" for i in range(data.ndim - 4)]
    x = np.moveaxis(np.conj(data.reshape(data.shape[3:])), 0, -1).astype(np.complex128)
    return _recentre(x, img, dwell, mhz), tags, 1.0 / dwell, mhz


def _recentre(x: np.ndarray, img: Any, dwell: float, mhz: float) -> np.ndarray:
    """Shift the FID so the band centre sits at 4.65 ppm, when the header says it does not."""
    shift, rx = _number(_hdr(img, "SpecFreqChemShift")), _number(_hdr(img, "RxOffset"))
    centre = (PPM_REFERENCE if shift is None else shift) + (0.0 if rx is None else rx)
    if abs(centre - PPM_REFERENCE) < 1e-6:
        return x
    t = np.arange(x.shape[-1]) * dwell
    return x * np.exp(2j * np.pi * (centre - PPM_REFERENCE) * mhz * t)


def combine_coils(x: np.ndarray, axis: int) -> np.ndarray:
    """Weighted coil combination (Hall et al. 2014; MRS consensus): w_c = conj(s_c(0)) / sigma_c^2.

    s_c(0) is each coil's first FID point averaged over all transients (phase and signal
    strength), sigma_c^2 its noise variance from the last 10 % of the FID. Dividing by sum |w|
    keeps the amplitude on the scale of one coil. Noise-free (simulated) coils get equal noise.
    """
    x = np.moveaxis(x, axis, 0)
    mean = x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)  # coil, points
    s0 = mean[:, 0]
    tail = x[..., -max(4, x.shape[-1] // 10):].reshape(x.shape[0], -1)
    var = tail.var(axis=1)
    if not np.all(var > 0):
        var = np.ones_like(var)
    w = np.conj(s0) / var
    if not np.any(w):  # no signal at t=0 anywhere: fall back to a plain sum
        w = np.ones_like(w)
    w = w / np.abs(w).sum()
    return np.tensordot(w, x, axes=(0, 0))


def _edit_labels(img: Any, dim_index: int) -> list[str] | None:
    """ON/OFF labels from the dim header's EditCondition, or None when it does not say."""
    head = _hdr(img, f"dim_{dim_index + 5}_header")
    cond = head.get("EditCondition") if isinstance(head, dict) else None
    if isinstance(cond, dict):
        cond = cond.get("Value")
    if not isinstance(cond, (list, tuple)):
        return None
    names = {"ON": "ON", "1": "ON", "TRUE": "ON", "OFF": "OFF", "0": "OFF", "FALSE": "OFF"}
    labels = [names.get(str(c).strip().upper()) for c in cond]
    return labels if sorted(labels, key=str) == ["OFF", "ON"] else None


def _naa_height(fid: np.ndarray, bw: float, mhz: float) -> float:
    ppm = ppm_axis(fid.shape[-1], bw, mhz)
    spec = np.abs(np.fft.fftshift(np.fft.fft(fid)))
    return float(spec[(ppm >= 1.9) & (ppm <= 2.1)].max(initial=0.0))


def _order_edit(x: np.ndarray, axis: int, img: Any, tag_index: int, bw: float, mhz: float,
                source: str) -> tuple[np.ndarray, str]:
    """Reorder the edit axis to (OFF, ON).

    The header's EditCondition decides when present (spec2nii writes it for GE and for
    HERMES-free Siemens/NIfTI-MRS data). Otherwise the sub-spectrum whose NAA (2.0 ppm) peak
    is smaller is taken as ON: a GABA-editing pulse at 1.9 ppm partly saturates NAA, the
    classification Gannet/Osprey use. Edits far from NAA (e.g. GSH at 4.56 ppm) can fool it.
    """
    n = x.shape[axis]
    if n != 2:
        raise MRSDataError(source, f"DIM_EDIT with {n} conditions is not supported "
                                   "(two-condition MEGA editing only)")
    labels = _edit_labels(img, tag_index)
    how = "header"
    if labels is None:
        subs = np.moveaxis(x, axis, 0).reshape(2, -1, x.shape[-1]).mean(axis=1)
        on = int(np.argmin([_naa_height(s, bw, mhz) for s in subs]))
        labels, how = ["ON" if i == on else "OFF" for i in range(2)], "naa_heuristic"
    order = [labels.index("OFF"), labels.index("ON")]
    return np.take(x, order, axis=axis), how


def _reduce(img: Any, source: str) -> tuple[np.ndarray, tuple[str, ...], dict[str, Any], float, float, list[str]]:
    """Data -> transients (n_transients, n_sub, points), sub names, notes, bw, MHz, original tags."""
    x, tags, bw, mhz = _as_block(img, source)
    original, notes = list(tags), {}
    for bad in UNSUPPORTED_DIMS:
        if bad in tags:
            raise MRSDataError(source, f"{bad} data (uncombined) are not supported")
    tag_pos = {t: i for i, t in enumerate(tags)}
    if "DIM_COIL" in tags:
        notes["n_coils"] = int(x.shape[tag_pos["DIM_COIL"]])
        x = combine_coils(x, tag_pos["DIM_COIL"]) if notes["n_coils"] > 1 else x.squeeze(tag_pos["DIM_COIL"])
        tags = [t for t in tags if t != "DIM_COIL"]
    sub: tuple[str, ...] = ("avg",)
    if "DIM_EDIT" in tags:
        i = tags.index("DIM_EDIT")
        x, notes["edit_order"] = _order_edit(x, i, img, original.index("DIM_EDIT"), bw, mhz, source)
        x, tags, sub = np.moveaxis(x, i, -2), [t for t in tags if t != "DIM_EDIT"] + ["DIM_EDIT"], ("OFF", "ON")
    else:
        x = x[..., None, :]
    keep = [t in TRANSIENT_DIMS or t.startswith("DIM_USER") or t == "DIM_UNKNOWN" for t in tags[: x.ndim - 2]]
    first_only = [t for t, k in zip(tags, keep) if not k]
    if first_only:  # TE/TI series, indirect dims: not repeats; keep the first acquisition
        notes["first_index_only"] = first_only
        index = tuple(slice(None) if k else 0 for k in keep)
        x = x[index]
    trans = x.reshape(-1, len(sub), x.shape[-1])
    notes["n_transients"] = int(trans.shape[0])
    return trans, sub, notes, bw, mhz, original


def load_nifti_mrs_image(img: Any, source: str, *, keep_transients: bool = False) -> Spectrum:
    """One NIfTI-MRS object (from a file or any spec2nii reader) -> a coil-combined, averaged Spectrum.

    Coils are combined (`combine_coils`), repeats (DIM_DYN/MEAS/PHASE_CYCLE/USER_*) averaged,
    DIM_EDIT becomes rows ("OFF", "ON"); other dims (TE/TI series, indirect) keep index 0.
    """
    trans, sub, notes, bw, mhz, original = _reduce(img, source)
    fid = trans.mean(axis=0)
    te, tr = _number(_hdr(img, "EchoTime")), _number(_hdr(img, "RepetitionTime"))
    sequence = _hdr(img, "ProtocolName") or _hdr(img, "SequenceName")
    original_file = _hdr(img, "OriginalFile")
    if original_file:
        notes["original_file"] = [str(f) for f in np.atleast_1d(original_file)]
    prov = Provenance(
        source=str(source),
        vendor=normalise_vendor(_hdr(img, "Manufacturer")),
        field_t=mhz / GAMMA_1H_MHZ_PER_T,
        spectrometer_mhz=mhz,
        bandwidth_hz=bw,
        points=int(fid.shape[-1]),
        te_ms=None if te is None else te * 1000.0,
        tr_ms=None if tr is None else tr * 1000.0,
        dims=original,
        sequence=None if sequence is None else str(sequence),
        extra=notes,
    )
    return Spectrum(
        fid=fid.astype(np.complex64), bandwidth_hz=bw, spectrometer_mhz=mhz, sub=sub, provenance=prov,
        transients=trans.astype(np.complex64) if keep_transients else None,
    )


def _reference_fid(img: Any, source: str, spec: Spectrum) -> np.ndarray | None:
    """A water reference as one FID on the metabolite's grid, or None when it does not fit."""
    try:
        trans, _, _, bw, _, _ = _reduce(img, source)
    except MRSDataError:
        return None
    if not np.isclose(bw, spec.bandwidth_hz, rtol=1e-3):
        return None
    ref = trans.mean(axis=(0, 1))
    out = np.zeros(spec.points, dtype=np.complex64)
    out[: min(ref.size, spec.points)] = ref[: spec.points]
    return out


# --------------------------------------------------------------------------- water-reference siblings
def reference_candidates(path: str | Path, listing: dict[str, Path] | None = None) -> list[Path]:
    """Existing sibling files that would be this file's water reference.

    Naming is not standardised; these cover Philips (*_act -> *_ref), spec2nii/BIDS-like
    NIfTI-MRS (metab -> wref/ref/water, *_wref, *_ref) and the same patterns for other formats.
    Matching ignores letter case. `listing` (lower-case name -> path) spares re-reading a folder.
    """
    path = Path(path)
    stem, suffix = _stem(path), _suffix(path)
    if listing is None:
        listing = _listing(path.parent)
    names = [re.sub(r"_act$", "_ref", stem, flags=re.I)] if re.search(r"_act$", stem, re.I) else []
    for token in ("wref", "ref", "water"):
        if re.search("metab", stem, re.I):
            names.append(re.sub("metab", token, stem, flags=re.I))
        names.append(f"{stem}_{token}")
    found = [listing.get((name + suffix).lower()) for name in dict.fromkeys(names)]
    return [f for f in dict.fromkeys(found) if f is not None and f.name != path.name]


def _listing(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def load_spectrum(path: str | Path, *, keep_transients: bool = False) -> Spectrum:
    """One MRS file -> Spectrum on its native grid, water reference attached when one is found."""
    path = Path(path)
    images, names = _read_images(path)
    main, ref_img = _split_outputs(images, names)
    spec = load_nifti_mrs_image(main, str(path), keep_transients=keep_transients)
    if ref_img is not None:
        spec.reference = _reference_fid(ref_img, str(path), spec)
        if spec.reference is not None:
            spec.provenance.extra["reference_file"] = "integrated"
    for cand in reference_candidates(path) if spec.reference is None else []:
        try:
            ref_images, ref_names = _read_images(cand)
        except MRSDataError:
            continue
        spec.reference = _reference_fid(_split_outputs(ref_images, ref_names)[0], str(cand), spec)
        if spec.reference is not None:
            spec.provenance.extra["reference_file"] = str(cand)
            break
    return spec


def supported_files(folder: Path) -> list[Path]:
    """Data files under `folder` that a reader exists for (sorted, recursive; no hidden files, no sidecars)."""
    files = []
    for p in sorted(folder.rglob("*")):
        if p.name.startswith(".") or not p.is_file():
            continue
        suffix = _suffix(p)
        if suffix in SUPPORTED_SUFFIXES and suffix not in SIDECAR_SUFFIXES:
            files.append(p)
    return files


def load_folder(folder: str | Path, *, keep_transients: bool = False) -> tuple[list[Spectrum], list[MRSDataError]]:
    """Every supported file under `folder` (sorted, recursive); bad files are reported, not raised.

    Only a missing folder raises. A folder without usable spectra gives ([], errors): callers decide.

    Files that are another file's water reference are attached to it, not loaded on their own;
    sidecars (.spar, .list, .json) travel with their data file. Unknown suffixes are ignored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MRSDataError(folder, "folder does not exist")
    files = supported_files(folder)
    listings = {d: _listing(d) for d in {f.parent for f in files}}
    refs = {c for f in files for c in reference_candidates(f, listings[f.parent])}
    spectra, errors = [], []
    for f in files:
        if f in refs:
            continue
        try:
            spectra.append(load_spectrum(f, keep_transients=keep_transients))
        except MRSDataError as err:
            errors.append(err)
    return spectra, errors


# --------------------------------------------------------------------------- conversion
def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "spectrum"


def convert_files(inputs: list[str | Path], out_dir: str | Path) -> tuple[list[Path], list[MRSDataError]]:
    """Vendor files -> NIfTI-MRS (.nii.gz), with spec2nii's header extension kept as is.

    NIfTI-MRS inputs are re-saved. Every output is first checked with the loader's own checks,
    so nothing is written that `load_spectrum` would refuse.
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    errors: list[MRSDataError] = []
    for item in inputs:
        path = Path(item)
        try:
            images, names = _read_images(path)
            for img in images:  # validate everything before writing anything
                _reduce(img, str(path))
            stem = _stem(path)
            for k, (img, name) in enumerate(zip(images, names)):
                label = stem if k == 0 else (name if name.startswith(stem) else f"{stem}_{name}")
                target = out_dir / f"{_safe_name(label)}.nii.gz"
                n = 1
                while target in written:
                    target, n = out_dir / f"{_safe_name(label)}_{n}.nii.gz", n + 1
                out_dir.mkdir(parents=True, exist_ok=True)
                _call(target, "could not write NIfTI-MRS", img.save, str(target))
                written.append(target)
        except MRSDataError as err:
            errors.append(err)
        except OSError as exc:
            errors.append(MRSDataError(path, f"could not write output ({_short(exc)})"))
    return written, errors


__all__ = [
    "SUPPORTED_SUFFIXES", "load_spectrum", "load_nifti_mrs_image", "load_folder", "convert_files",
    "combine_coils", "reference_candidates",
]
