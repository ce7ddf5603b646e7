"""Read real MRS files into `Spectrum` records (on their native grid) and convert them to NIfTI-MRS.

The public entry points: `load_spectrum`, `load_folder`, `supported_files`, `reference_candidates`
(water-reference siblings) and `convert_files`. Reading goes through data/vendor.py (spec2nii's
readers) and data/nifti.py (one NIfTI-MRS -> Spectrum path for every source); every failure is one
`MRSDataError` with a short reason, so a command line or a dataset can report it and go on.
"""

from __future__ import annotations

import re
from pathlib import Path

from mrsfm_model.data.nifti import combine_coils, load_nifti_mrs_image, reduce_image, reference_fid
from mrsfm_model.data.spectrum import Spectrum
from mrsfm_model.data.vendor import (
    SUPPORTED_SUFFIXES,
    call_reader,
    file_stem,
    file_suffix,
    folder_listing,
    read_images,
    short_reason,
    split_outputs,
)
from mrsfm_model.errors import MRSDataError

SIDECAR_SUFFIXES = (".spar", ".json", ".list")  # never loaded on their own by load_folder

# --------------------------------------------------------------------------- water-reference siblings
def reference_candidates(path: str | Path, listing: dict[str, Path] | None = None) -> list[Path]:
    """Existing sibling files that would be this file's water reference.

    Naming is not standardised; these cover Philips (*_act -> *_ref), spec2nii/BIDS-like
    NIfTI-MRS (metab -> wref/ref/water, *_wref, *_ref) and the same patterns for other formats.
    Matching ignores letter case. `listing` (lower-case name -> path) spares re-reading a folder.
    """
    path = Path(path)
    stem, suffix = file_stem(path), file_suffix(path)
    if listing is None:
        listing = folder_listing(path.parent)
    names = [re.sub(r"_act$", "_ref", stem, flags=re.I)] if re.search(r"_act$", stem, re.I) else []
    for token in ("wref", "ref", "water"):
        if re.search("metab", stem, re.I):
            names.append(re.sub("metab", token, stem, flags=re.I))
        names.append(f"{stem}_{token}")
    found = [listing.get((name + suffix).lower()) for name in dict.fromkeys(names)]
    return [f for f in dict.fromkeys(found) if f is not None and f.name != path.name]


def load_spectrum(path: str | Path, *, keep_transients: bool = False) -> Spectrum:
    """One MRS file -> Spectrum on its native grid, water reference attached when one is found."""
    path = Path(path)
    images, names = read_images(path)
    main, ref_img = split_outputs(images, names)
    spec = load_nifti_mrs_image(main, str(path), keep_transients=keep_transients)
    if ref_img is not None:
        spec.reference = reference_fid(ref_img, str(path), spec)
        if spec.reference is not None:
            spec.provenance.extra["reference_file"] = "integrated"
    for cand in reference_candidates(path) if spec.reference is None else []:
        try:
            ref_images, ref_names = read_images(cand)
        except MRSDataError:
            continue
        spec.reference = reference_fid(split_outputs(ref_images, ref_names)[0], str(cand), spec)
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
        suffix = file_suffix(p)
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
    listings = {d: folder_listing(d) for d in {f.parent for f in files}}
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
            images, names = read_images(path)
            for img in images:  # validate everything before writing anything
                reduce_image(img, str(path))
            stem = file_stem(path)
            for k, (img, name) in enumerate(zip(images, names)):
                label = stem if k == 0 else (name if name.startswith(stem) else f"{stem}_{name}")
                target = out_dir / f"{_safe_name(label)}.nii.gz"
                n = 1
                while target in written:
                    target, n = out_dir / f"{_safe_name(label)}_{n}.nii.gz", n + 1
                out_dir.mkdir(parents=True, exist_ok=True)
                call_reader(target, "could not write NIfTI-MRS", img.save, str(target))
                written.append(target)
        except MRSDataError as err:
            errors.append(err)
        except OSError as exc:
            errors.append(MRSDataError(path, f"could not write output ({short_reason(exc)})"))
    return written, errors


__all__ = [
    "SUPPORTED_SUFFIXES", "load_spectrum", "load_nifti_mrs_image", "load_folder", "convert_files",
    "combine_coils", "reference_candidates",
]
