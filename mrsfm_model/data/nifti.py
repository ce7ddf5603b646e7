"""NIfTI-MRS images -> `Spectrum`: coil combination, averaging of transients and edit-condition
ordering, alike for every source (spec2nii turns each vendor format into these images).

Sign convention: NIfTI-MRS files store the FID so that FSL-MRS (and `NIFTI_MRS[...]`) conjugate
it on read; with the stored data, fftshift(fft(fid)) puts NAA at 7.3 ppm (mirrored about water).
`Spectrum` wants fftshift(fft(fid)) with ppm rising with index, so readers here use the conjugate
of the stored data (checked: NAA at 2.0 ppm for the Philips, Siemens RDA/DICOM and 7 T files).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mrsfm_model.data.spectrum import (
    GAMMA_1H_MHZ_PER_T,
    PPM_REFERENCE,
    Provenance,
    Spectrum,
    normalise_vendor,
    ppm_axis,
)
from mrsfm_model.data.vendor import short_reason
from mrsfm_model.errors import MRSDataError

TRANSIENT_DIMS = ("DIM_DYN", "DIM_MEAS", "DIM_PHASE_CYCLE")  # plus DIM_USER_*: repeats, averaged
UNSUPPORTED_DIMS = ("DIM_ISIS",)  # un-combined ISIS scans are not localised on their own
MIN_POINTS = 16


# --------------------------------------------------------------------------- header fields
def header_value(img: Any, key: str) -> Any:
    """A NIfTI-MRS header-extension field, None when absent (vendors fill different ones)."""
    try:
        return img.hdr_ext[key]
    except Exception:
        return None


def as_number(value: Any) -> float | None:
    """A header value as a finite float (first element of a list), else None."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


# --------------------------------------------------------------------------- NIfTI-MRS -> Spectrum
def _as_block(img: Any, source: str) -> tuple[np.ndarray, list[str], float, float]:
    """Validated data in our convention: (higher dims..., points), dim tags, bandwidth, MHz."""
    try:
        data = np.asarray(img.image.data)
        dwell, mhz, nucleus = float(img.dwelltime), as_number(img.spectrometer_frequency), img.nucleus
        tags_all = list(img.dim_tags)
    except Exception as exc:
        raise MRSDataError(source, f"NIfTI-MRS header or data unreadable ({short_reason(exc)})") from None
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
    shift, rx = as_number(header_value(img, "SpecFreqChemShift")), as_number(header_value(img, "RxOffset"))
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
    head = header_value(img, f"dim_{dim_index + 5}_header")
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


def reduce_image(img: Any, source: str) -> tuple[np.ndarray, tuple[str, ...], dict[str, Any], float, float, list[str]]:
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
    trans, sub, notes, bw, mhz, original = reduce_image(img, source)
    fid = trans.mean(axis=0)
    te, tr = as_number(header_value(img, "EchoTime")), as_number(header_value(img, "RepetitionTime"))
    sequence = header_value(img, "ProtocolName") or header_value(img, "SequenceName")
    original_file = header_value(img, "OriginalFile")
    if original_file:
        notes["original_file"] = [str(f) for f in np.atleast_1d(original_file)]
    prov = Provenance(
        source=str(source),
        vendor=normalise_vendor(header_value(img, "Manufacturer")),
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


def reference_fid(img: Any, source: str, spec: Spectrum) -> np.ndarray | None:
    """A water reference as one FID on the metabolite's grid, or None when it does not fit."""
    try:
        trans, _, _, bw, _, _ = reduce_image(img, source)
    except MRSDataError:
        return None
    if not np.isclose(bw, spec.bandwidth_hz, rtol=1e-3):
        return None
    ref = trans.mean(axis=(0, 1))
    out = np.zeros(spec.points, dtype=np.complex64)
    out[: min(ref.size, spec.points)] = ref[: spec.points]
    return out
