"""Broken, empty, truncated and wrong inputs: each must give one MRSDataError naming the file and why.

Why: users point the CLI and the dataset loaders at whole folders of clinical exports; one bad file
must produce one readable line, never a library traceback or another exception type.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import DATA, INVIVO
from nifti_mrs.create_nmrs import gen_nifti_mrs

from mrsfm_model.data.io import SUPPORTED_SUFFIXES, load_folder, load_spectrum
from mrsfm_model.errors import MRSDataError

PHILIPS = INVIVO / "philips"
SIEMENS = INVIVO / "siemens"
NIFTI = DATA / "nifti_mrs"


def _fid(points: int = 512) -> np.ndarray:
    t = np.arange(points) / 2000.0
    return (np.exp((2j * np.pi * -340.0 - 10.0) * t) + 0.01).astype(np.complex64)


def _nmrs(path: Path, data: np.ndarray, nucleus: str = "1H", dim_tags=(None, None, None)) -> Path:
    mhz = 127.7 if nucleus == "1H" else 51.7
    gen_nifti_mrs(data, 1 / 2000.0, mhz, nucleus=nucleus, dim_tags=list(dim_tags)).save(str(path))
    return path


def _copy(src: Path, dst: Path, n_bytes: int | None = None) -> Path:
    raw = src.read_bytes()
    dst.write_bytes(raw if n_bytes is None else raw[:n_bytes])
    return dst


def _sdat_pair(tmp: Path, stem: str, sdat_bytes: int | None = None, spar_text: str | None = None) -> Path:
    sdat = _copy(PHILIPS / "sub-01_PRESS_35_act.sdat", tmp / f"{stem}.sdat", sdat_bytes)
    spar = tmp / f"{stem}.spar"
    if spar_text is None:
        _copy(PHILIPS / "sub-01_PRESS_35_act.spar", spar)
    else:
        spar.write_text(spar_text)
    return sdat


def _rda_header_only(tmp: Path) -> Path:
    raw = (SIEMENS / "SVS_30.rda").read_bytes()
    end = raw.find(b">>> End of header <<<")
    return _copy(SIEMENS / "SVS_30.rda", tmp / "header_only.rda", raw.find(b"\n", end) + 1)


def _rda_mrsi(tmp: Path) -> Path:
    raw = (SIEMENS / "SVS_30.rda").read_bytes()
    raw = raw.replace(b"CSIMatrixSize[0]: 1\r\n", b"CSIMatrixSize[0]: 4\r\n", 1)
    (tmp / "mrsi.rda").write_bytes(raw)
    return tmp / "mrsi.rda"


def _bytes(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def _random(tmp: Path, name: str, n: int = 4096, seed: int = 0) -> Path:
    return _bytes(tmp, name, np.random.default_rng(seed).bytes(n))


def _plain_nifti(tmp: Path) -> Path:
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(tmp / "anatomy.nii.gz"))
    return tmp / "anatomy.nii.gz"


def _mr_image_dicom(tmp: Path) -> Path:
    """A valid DICOM (an MR image, not spectroscopy) from Siemens."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp / "image.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Manufacturer, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SIEMENS", "MR", 1, 1
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.zeros((2, 2), np.uint16).tobytes()
    ds.save_as(str(tmp / "image.dcm"), enforce_file_format=True)
    return tmp / "image.dcm"


def _dir(tmp: Path) -> Path:
    (tmp / "x.nii.gz").mkdir()
    return tmp / "x.nii.gz"


def _text(tmp: Path, name: str, text: str = "this is not MRS data\n") -> Path:
    (tmp / name).write_text(text)
    return tmp / name


F = _fid()
SPAR_TEXT = (PHILIPS / "sub-01_PRESS_35_act.spar").read_text()


def _one(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.complex64).reshape(1, 1, 1, -1)


def _poisoned(tmp: Path, name: str, value: float) -> Path:
    return _nmrs(tmp / name, _one(np.where(np.arange(F.size) == 7, value, F)))


def _uncompressed_cut(tmp: Path) -> Path:
    raw = gzip.decompress((NIFTI / "siemens7T_steam_metab.nii.gz").read_bytes())
    return _bytes(tmp, "cut.nii", raw[:3000])


def _hermes(tmp: Path) -> Path:
    data = np.stack([F] * 4, -1).reshape(1, 1, 1, -1, 4)
    return _nmrs(tmp / "hermes.nii.gz", data, dim_tags=("DIM_EDIT", None, None))


# (case id, builder(tmp) -> path, words the reason must contain)
CASES = [
    ("empty_nii_gz", lambda t: _text(t, "empty.nii.gz", ""), "empty"),
    ("truncated_nii_gz", lambda t: _copy(NIFTI / "siemens7T_steam_metab_raw.nii.gz", t / "cut.nii.gz", 20000),
     "truncated"),
    ("text_as_nii_gz", lambda t: _text(t, "notes.nii.gz"), "NIfTI"),
    ("truncated_nii", _uncompressed_cut, "NIfTI"),
    ("plain_nifti_image", _plain_nifti, "not NIfTI-MRS"),
    ("nifti_mrs_nan", lambda t: _poisoned(t, "nan.nii.gz", np.nan), "NaN"),
    ("nifti_mrs_inf", lambda t: _poisoned(t, "inf.nii.gz", np.inf), "Inf"),
    ("nifti_mrs_zeros", lambda t: _nmrs(t / "zeros.nii.gz", _one(np.zeros(512))), "all zero"),
    ("nifti_mrs_mrsi", lambda t: _nmrs(t / "mrsi.nii.gz", np.tile(F, (3, 1, 1, 1))), "MRSI (3 voxels)"),
    ("nifti_mrs_31p", lambda t: _nmrs(t / "phosphorus.nii.gz", _one(F), nucleus="31P"), "31P"),
    ("nifti_mrs_hermes", _hermes, "DIM_EDIT with 4"),
    ("nifti_mrs_too_short", lambda t: _nmrs(t / "short.nii.gz", _one(F[:4])), "points"),
    ("empty_sdat", lambda t: _sdat_pair(t, "empty", sdat_bytes=0), "empty"),
    ("truncated_sdat", lambda t: _sdat_pair(t, "cut", sdat_bytes=5000), "truncated"),
    ("sdat_without_spar", lambda t: _copy(PHILIPS / "sub-01_PRESS_35_act.sdat", t / "lonely.sdat"), "SPAR"),
    ("spar_garbage", lambda t: _sdat_pair(t, "garbage", spar_text="%%% no colon here\n\x00\x01 junk\n"), "SPAR"),
    ("spar_missing_keys", lambda t: _sdat_pair(t, "nokeys", spar_text="scan_id : x\nsamples : 2048\n"), "rows"),
    ("spar_31p", lambda t: _sdat_pair(t, "p31", spar_text=SPAR_TEXT.replace("nucleus : 1H", "nucleus : 31P")), "31P"),
    ("empty_rda", lambda t: _text(t, "empty.rda", ""), "empty"),
    ("rda_header_only", _rda_header_only, "truncated"),
    ("rda_garbage", lambda t: _text(t, "garbage.rda", "random words\nno header at all\n"), "not a Siemens RDA"),
    ("rda_mrsi", _rda_mrsi, "MRSI (4 voxels)"),
    ("empty_ima", lambda t: _text(t, "empty.IMA", ""), "empty"),
    ("random_ima", lambda t: _random(t, "noise.IMA"), "not a DICOM"),
    ("dicom_image_not_mrs", _mr_image_dicom, "spectroscopy"),
    ("random_dat", lambda t: _random(t, "meas_noise.dat", seed=1), "twix"),
    ("random_p_file", lambda t: _random(t, "P12345.7", seed=2), "P-file"),
    ("zero_p_file", lambda t: _bytes(t, "P00000.7", bytes(70000)), "P-file"),
    ("data_without_list", lambda t: _random(t, "raw_001.data", seed=3), ".list"),
    ("list_without_data", lambda t: _text(t, "raw_001.list", "garbage\n"), ".data"),
    ("unsupported_txt", lambda t: _text(t, "spectrum.txt"), "supported"),
    ("directory_named_nii_gz", _dir, "directory"),
    ("missing_file", lambda t: t / "does_not_exist.rda", "does not exist"),
]
# skipped by load_folder; and the lone .list, which the lone .data of another case pairs with there
NOT_IN_FOLDER = ("missing_file", "unsupported_txt", "directory_named_nii_gz", "list_without_data")


@pytest.mark.parametrize("case_id,build,reason", CASES, ids=[c[0] for c in CASES])
def test_bad_file_gives_one_clear_error(tmp_path: Path, case_id: str, build, reason: str) -> None:
    path = build(tmp_path)
    with pytest.raises(MRSDataError) as info:  # any other exception type fails the test
        load_spectrum(path)
    msg = str(info.value)
    assert path.name in msg
    assert reason.lower() in info.value.problem.lower(), msg
    assert "Traceback" not in msg and "\n" not in msg
    assert len(info.value.problem) < 250


def test_every_readable_format_has_a_bad_file_case(tmp_path: Path) -> None:
    """A format added to the reader table without a broken example of it fails here."""
    names = []
    for case_id, build, _ in CASES:
        (tmp_path / case_id).mkdir()
        names.append(build(tmp_path / case_id).name.lower())
    missing = [s for s in SUPPORTED_SUFFIXES if not any(n.endswith(s.lower()) for n in names)]
    assert not missing, f"no bad-file case for {missing}"


def test_supported_suffix_list_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(MRSDataError) as info:
        load_spectrum(_text(tmp_path, "x.csv"))
    for suffix in SUPPORTED_SUFFIXES:
        assert suffix in info.value.problem


def test_folder_of_only_bad_files_reports_each(tmp_path: Path) -> None:
    """load_folder never raises for bad files: one error each (a directory named x.nii.gz is walked, not loaded)."""
    bad = [build(tmp_path) for cid, build, _ in CASES if cid not in NOT_IN_FOLDER]
    _dir(tmp_path)
    shutil.copy(PHILIPS / "sub-01_PRESS_35_act.spar", tmp_path / "orphan.spar")  # sidecar alone: ignored
    spectra, errors = load_folder(tmp_path)
    assert spectra == []
    named = " ".join(str(e) for e in errors)
    assert len(errors) == len(bad)
    for p in bad:
        assert p.name in named
