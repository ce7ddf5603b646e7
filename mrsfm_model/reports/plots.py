"""Figures a person looks at: spectra on a ppm axis the way MRS users read them (ppm falling
to the right) and spectrogram images with ppm and time axes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mrsfm_model.data.canonical import CanonicalGrid  # noqa: E402
from mrsfm_model.data.spectrogram import SpectrogramConfig, spectrogram_axes  # noqa: E402
from mrsfm_model.data.spectrum import Spectrum  # noqa: E402


def show_spectrogram(ax, image: np.ndarray, lim: float | None = None, signed: bool | None = None, **kwargs) -> None:
    """Symmetric colour scale at the 99.5th percentile of |x|: a few huge pixels at t = 0
    would otherwise leave the rest of the image one flat colour. `signed` (default: whether the
    image has negative pixels) picks the diverging scale; pass the original's to show a
    reconstruction on the same scale as the image it reconstructs."""
    finite = image[np.isfinite(image)]
    if lim is None:
        lim = float(np.percentile(np.abs(finite), 99.5)) if finite.size else 1.0
    lim = lim or 1.0
    if signed is None:
        signed = bool(finite.size and finite.min() < 0)
    if not signed:  # magnitude images: sequential scale from zero
        ax.imshow(image, aspect="auto", cmap="magma", vmin=0, vmax=lim, **kwargs)
    else:
        ax.imshow(image, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, **kwargs)


def plot_spectrum_and_spectrogram(
    spec: Spectrum, image: np.ndarray, channels: list[str], cfg: SpectrogramConfig,
    grid: CanonicalGrid, out: str | Path, title: str = "",
) -> Path:
    """Spectrum (real part, each sub-spectrum) over 0-5 ppm + one spectrogram per channel."""
    n_ch = image.shape[0]
    fig, axes = plt.subplots(1, 1 + n_ch, figsize=(5 + 3.2 * n_ch, 4), gridspec_kw={"width_ratios": [1.6] + [1] * n_ch})
    ax = axes[0]
    ppm = spec.ppm_axis()
    window = (ppm > 0.2) & (ppm < 5.0)
    for name in dict.fromkeys(list(spec.sub) + (["DIFF"] if spec.edited else [])):
        s = np.fft.fftshift(np.fft.fft(spec.row(name))).real
        ax.plot(ppm[window], s[window], lw=0.8, label=name)
    ax.set_xlim(5.0, 0.2)  # MRS convention: ppm decreases to the right
    ax.set_xlabel("chemical shift (ppm)")
    ax.set_ylabel("real part (normalised)")
    ax.legend(fontsize=7)
    ax.set_title(title or Path(spec.provenance.source).name, fontsize=9)
    row_ppm, t = spectrogram_axes(cfg, grid)
    top = np.nanmax(row_ppm)
    for c in range(n_ch):
        a = axes[1 + c]
        show_spectrogram(a, image[c], float(np.percentile(np.abs(image), 99.5)),
                         extent=(t[0], t[-1], np.nanmin(row_ppm), top))
        a.set_title(f"spectrogram: {channels[c]}", fontsize=9)
        a.set_xlabel("time (s)")
        a.set_ylabel("ppm")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
