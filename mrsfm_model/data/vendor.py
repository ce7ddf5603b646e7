"""Every vendor format through spec2nii's own Python readers (which all return NIfTI-MRS images),
each failure as one `MRSDataError` with a short reason."""

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

from mrsfm_model.data.spectrum import normalise_vendor
from mrsfm_model.errors import MRSDataError

MRS_SOP_CLASSES = {  # what spec2nii's DICOM readers accept as spectroscopy
    "1.3.12.2.1107.5.9.1": "Siemens CSA non-image", "1.2.840.10008.5.1.4.1.1.4.2": "MR Spectroscopy",
    "1.3.46.670589.11.0.0.12.1": "Philips private MR spectrum",
}


# --------------------------------------------------------------------------- small helpers
def file_suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def file_stem(path: Path) -> str:
    return path.name[: len(path.name) - len(file_suffix(path))]


def short_reason(exc: BaseException, path: Path | None = None) -> str:
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


def call_reader(path: Path, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
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
            problem = short_reason(exc, path)
    raise MRSDataError(path, f"{what} ({problem})")


def folder_listing(folder: Path) -> dict[str, Path]:
    """Lower-cased file name -> file, for the case-insensitive sibling lookups vendor pairs need."""
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def _sibling(path: Path, suffix: str) -> Path | None:
    """The file next to `path` with the same stem and `suffix` in any letter case."""
    exact = path.parent / (file_stem(path) + suffix)
    if exact.is_file():
        return exact
    return folder_listing(path.parent).get((file_stem(path) + suffix).lower())


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
            raise MRSDataError(path, f"invalid NIfTI-MRS header extension ({short_reason(exc, path)})") from None
        raise MRSDataError(path, f"not a readable NIfTI file: corrupt or truncated ({short_reason(exc, path)})") \
            from None
    return [img], [file_stem(path)]


def _read_sdat(path: Path) -> tuple[list, list[str]]:
    read_sdat_spar_pair, read_spar = _lib("spec2nii.Philips.philips", "read_sdat_spar_pair", "read_spar")

    spar = _sibling(path, ".spar")
    if spar is None:
        raise MRSDataError(path, f"Philips SDAT without its SPAR header (expected {file_stem(path)}.SPAR next to it)")
    params = call_reader(path, f"its SPAR header {spar.name} cannot be parsed", read_spar, spar)
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
    return call_reader(path, "not a readable Philips SDAT/SPAR pair", read_sdat_spar_pair, path, spar, tags=tags)


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
    return call_reader(path, "RDA header could not be parsed", convert_rda, path, None, False)


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
    return call_reader(path, "DICOM spectroscopy data could not be read", multi_file_dicom, [path], None, None, False)


def _read_twix(path: Path) -> tuple[list, list[str]]:
    mapVBVD = _lib("mapvbvd", "mapVBVD")
    process_twix = _lib("spec2nii.Siemens.twixfunctions", "process_twix")

    head = np.fromfile(path, dtype="<u4", count=2)
    size = path.stat().st_size
    if head.size < 2 or not ((head[0] < 10000 and 0 < head[1] <= 64) or 0 < head[0] < size):
        raise MRSDataError(path, "not a Siemens twix (.dat) raw-data file (implausible header)")
    twix = call_reader(path, "not a readable Siemens twix (.dat) file", mapVBVD, str(path), quiet=True)
    if isinstance(twix, list):  # VD/VE multi-raid: the last measurement is the scan itself
        twix = twix[-1]
    overrides = {"dims": (None, None, None), "tags": (None, None, None)}
    return call_reader(path, "Siemens twix data could not be converted", process_twix,
                 twix, None, path.name, "image", overrides, quiet=True)


def _read_pfile(path: Path) -> tuple[list, list[str]]:
    read_pfile = _lib("spec2nii.GE.ge_pfile", "read_pfile")

    return call_reader(path, "not a readable GE P-file", read_pfile, path, None)


def _read_data_list(path: Path) -> tuple[list, list[str]]:
    read_data_list_pair = _lib("spec2nii.Philips.philips_data_list", "read_data_list_pair")

    given = path
    if file_suffix(path) == ".list":
        path = _sibling(path, ".data") or path.with_suffix(".data")
    lst, aux = _sibling(path, ".list"), _sibling(path, ".spar")
    if not path.is_file() or lst is None:  # named as the user gave it (a .list alone names the .list)
        raise MRSDataError(given, "Philips data/list needs both the .data and the .list file")
    if aux is None:
        raise MRSDataError(path, f"Philips data/list needs its SPAR header ({file_stem(path)}.SPAR) next to it")
    return call_reader(path, "not a readable Philips data/list pair", read_data_list_pair, path, lst, aux)


_READERS: dict[str, Callable[[Path], tuple[list, list[str]]]] = {
    ".nii.gz": _read_nifti, ".nii": _read_nifti, ".sdat": _read_sdat, ".rda": _read_rda,
    ".ima": _read_dicom, ".dcm": _read_dicom, ".dat": _read_twix, ".7": _read_pfile,
    ".data": _read_data_list, ".list": _read_data_list,
}
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_READERS)  # a new format is one entry of the table above


def read_images(path: Path) -> tuple[list, list[str]]:
    """Check the path, then run the reader its suffix names."""
    if not path.exists():
        raise MRSDataError(path, "file does not exist")
    if path.is_dir():
        raise MRSDataError(path, "is a directory, not a file")
    suffix = file_suffix(path)
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


def split_outputs(images: list, names: list[str]) -> tuple[Any, Any | None]:
    """Metabolite image and (integrated) water reference image among a reader's outputs."""
    if len(images) == 1:
        return images[0], None
    main = next((i for i, n in zip(images, names) if not _is_reference_name(n)), images[0])
    ref = next((i for i, n in zip(images, names) if re.search(r"ref|std_1", n.lower()) and i is not main), None)
    return main, ref
