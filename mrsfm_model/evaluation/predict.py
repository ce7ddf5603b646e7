"""Apply a study model (from `run_study`) to new spectra.

A model is only as good as the match between the inputs it was trained on and the inputs it
is given: the model file carries the settings of `data.InputBuilder` (the one recipe: load ->
canonical grid -> channels -> spectrogram), so `predict_files` rebuilds exactly the training
inputs whatever the current config says.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from mrsfm_model.data.io import load_folder, load_spectrum
from mrsfm_model.data.spectrum import Spectrum
from mrsfm_model.data.stream import InputBuilder, Prepared  # noqa: F401  (the recipe a study model file stores)
from mrsfm_model.errors import MRSDataError
from mrsfm_model.evaluation.networks import study_network
from mrsfm_model.model.quantifier import load_quantifier
from mrsfm_model.model.weights import NotSafetensors, read_metadata, read_tensors, save_weights
from mrsfm_model.reports.cards import read_card

STUDY_FORMAT = "mrsfm-study-model-v1"


# --------------------------------------------------------------------------- the model file
def save_study_model(model: nn.Module, path: Path, meta: dict[str, Any], card: dict[str, Any]) -> Path:
    """MODEL.safetensors (weights + what prediction needs, in its metadata) and MODEL.json (the card)."""

    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, path, {"format": STUDY_FORMAT, **meta})
    path.with_suffix(".json").write_text(json.dumps(card, indent=1, default=str))
    return path


def read_study_meta(path: str | Path) -> dict[str, Any]:
    """The prediction metadata of a study model; refuses any other file with a clear reason."""
    path = Path(path)
    if not path.is_file():
        raise MRSDataError(path, "model file not found")
    try:
        raw = read_metadata(path)
    except NotSafetensors as exc:
        raise MRSDataError(path, f"not a model file from `mrsfm finetune --data` (not safetensors: "
                                 f"{type(exc.cause).__name__})") from None
    if raw.get("format") == "mrsfm-encoder-v1":
        raise MRSDataError(path, "this is a pretrained encoder, not a fine-tuned study model; "
                                 "make one with `mrsfm finetune --data DIR --labels labels.csv --target COLUMN`")
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        meta = {}
    if meta.get("format") != STUDY_FORMAT:
        raise MRSDataError(path, f"not a model file from `mrsfm finetune --data` (no {STUDY_FORMAT} metadata)")
    return meta


def load_study_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from a study model file."""
    meta = read_study_meta(path)
    model = study_network(meta)
    try:
        model.load_state_dict(read_tensors(path))
    except (RuntimeError, KeyError) as exc:
        raise MRSDataError(path, f"weights do not fit the model described in its metadata "
                                 f"({str(exc).splitlines()[0][:160]})") from None
    return model.eval(), meta


# --------------------------------------------------------------------------- prediction
def outputs_to_rows(out: torch.Tensor, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Raw model outputs -> one dict per spectrum: label + class probabilities, or a value."""
    if meta["task"] == "classification":
        probs = torch.softmax(out.float(), dim=1).numpy()
        labels = meta["labels"]
        return [{"prediction": labels[int(p.argmax())], **{f"prob_{lab}": float(p[j]) for j, lab in enumerate(labels)}}
                for p in probs]
    stats = meta["target_stats"]
    values = out[:, 0].numpy() * stats["std"] + stats["mean"]
    return [{"prediction": float(v)} for v in values]


def _gather(inputs: Sequence[str | Path]) -> tuple[list[Spectrum], list[MRSDataError]]:
    """Folders (every supported file, water references attached) and single files, in order."""

    spectra: list[Spectrum] = []
    errors: list[MRSDataError] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found, errs = load_folder(path)
            spectra += found
            errors += errs
            if not found and not errs:
                errors.append(MRSDataError(path, "folder holds no supported MRS files"))
            continue
        try:
            spectra.append(load_spectrum(path))
        except MRSDataError as err:
            errors.append(err)
    return spectra, errors


def _images(inputs: Sequence[str | Path], builder: InputBuilder) -> tuple[list[str], list[torch.Tensor],
                                                                          list[MRSDataError]]:
    """(source files, model images, errors) of every readable spectrum in `inputs`, made by `builder`."""
    spectra, errors = _gather(inputs)
    files, images = [], []
    for spec in spectra:
        try:
            images.append(builder.prepare(spec).image)
            files.append(spec.provenance.source)
        except MRSDataError as err:
            errors.append(err)
    return files, images, errors


def write_predictions(rows: list[dict[str, Any]], out: str | Path | TextIO) -> None:
    """Rows as CSV (file, prediction, prob_<label>...) to a path or an open text stream (stdout)."""
    if not isinstance(out, (str, Path)):
        fields = list(dict.fromkeys(k for r in rows for k in r)) or ["file", "prediction"]
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        write_predictions(rows, f)


@torch.no_grad()
def predict_files(
    model_path: str | Path, inputs: Sequence[str | Path], out_csv: str | Path | None = None,
    device: torch.device | str = "cpu", batch_size: int = 32,
) -> tuple[list[dict[str, Any]], list[MRSDataError]]:
    """Predict every readable spectrum in `inputs` (files or folders); unreadable ones come back
    as errors with their reason and do not stop the rest. Rows: file, prediction, prob_<label>."""
    model, meta = load_study_model(model_path)
    builder = InputBuilder.from_dict(meta["inputs"])
    files, images, errors = _images(inputs, builder)
    rows: list[dict[str, Any]] = []
    device = torch.device(device)
    model.to(device)
    for i in range(0, len(images), batch_size):
        out = model(torch.stack(images[i:i + batch_size]).to(device)).float().cpu()
        rows += [{"file": f, **r} for f, r in zip(files[i:i + batch_size], outputs_to_rows(out, meta))]
    if out_csv is not None:
        write_predictions(rows, out_csv)
    return rows, errors


@torch.no_grad()
def quantify_files(
    encoder: str | Path, inputs: Sequence[str | Path], out_csv: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[dict[str, Any]], list[MRSDataError]]:
    """The pretrained model's own estimates (model/quantifier.py) for every readable spectrum in
    `inputs`: metabolite ratios to tCr, linewidths, shift, phase, SNR. Inputs are made exactly as
    in the encoder's pretraining (its card's grid, spectrogram and channels); unreadable files come
    back as errors and do not stop the rest."""
    quantifier = load_quantifier(encoder).to(torch.device(device))
    card = read_card(encoder) or {}
    if not all(k in card for k in ("grid", "spectrogram", "channels")):
        raise MRSDataError(encoder, "its model card does not say which inputs it was pretrained on "
                                    "(grid, spectrogram, channels); it cannot quantify files")
    builder = InputBuilder.from_dict({k: card[k] for k in ("grid", "spectrogram", "channels")})
    files, images, errors = _images(inputs, builder)
    rows: list[dict[str, Any]] = []
    if images:
        est = quantifier.estimate(torch.stack(images))
        # what the inputs cannot carry is left out rather than guessed: a magnitude spectrogram has
        # no phase, and the grid removes residual water before the image is made
        hidden = {"phase0", "phase1"} if builder.spec_cfg.part == "abs" else set()
        hidden |= {"water"} if builder.grid.remove_water else set()
        est = {k: v for k, v in est.items() if k not in hidden}
        rows = [{"file": f, **{k: float(f"{float(v[i]):.4g}") for k, v in est.items()}} for i, f in enumerate(files)]
    if out_csv is not None:
        write_predictions(rows, out_csv)
    return rows, errors


__all__ = ["InputBuilder", "Prepared", "STUDY_FORMAT", "save_study_model", "load_study_model", "read_study_meta",
           "predict_files", "quantify_files", "write_predictions", "outputs_to_rows"]
