"""`mrsfm demo`: the main job on a fresh machine, on the files this repository ships.

Today it runs the data pipeline end to end (real files -> canonical grid -> simulated
vendor profiles -> mixed spectrogram batches) and writes what it saw under one folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .config import load_config, resolve_device

# Real in vivo files shipped with the repository (the synthetic MEGA-PRESS NIfTI-MRS file is
# left out: its stored data use another receiver reference, see tests/data/ATTRIBUTION.md).
SHIPPED_INVIVO = Path(__file__).resolve().parents[1] / "tests" / "data" / "invivo"


def _save_batch_png(x: torch.Tensor, vendor: torch.Tensor, invivo: torch.Tensor, out: Path) -> None:
    from .plots import plt, show_spectrogram
    from .spectrum import VENDORS

    n = min(8, x.shape[0])
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.6))
    for i, ax in enumerate(np.atleast_1d(axes)):
        show_spectrogram(ax, x[i, 0].cpu().numpy())
        v = VENDORS[int(vendor[i])] if int(vendor[i]) >= 0 else "?"
        ax.set_title(f"{'in vivo' if invivo[i] else 'sim'} {v}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def run_demo(out: str | Path, overrides: list[str] = (), n_sim: int = 4, log=print) -> dict:
    from .data import build_stream, select_channels
    from .grid import CanonicalGrid, to_canonical
    from .io import load_folder
    from .plots import plot_spectrum_and_spectrogram
    from .simulate import write_simulated
    from .spectrogram import SpectrogramConfig, SpectrogramTransform
    from .spectrum import peak_ppm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides)
    device = resolve_device(cfg.device)
    grid = CanonicalGrid.from_config(cfg.data.grid)
    transform = SpectrogramTransform(SpectrogramConfig.from_config(cfg.data.spectrogram), grid)
    channels = list(cfg.data.channels)
    t0 = time.perf_counter()

    log(f"[1/3] reading the shipped real files in {SHIPPED_INVIVO}")
    spectra, errors = load_folder(SHIPPED_INVIVO)
    rows = []
    for spec in spectra:
        canon = to_canonical(spec, grid)
        p = spec.provenance
        rows.append({"file": Path(p.source).name, "vendor": p.vendor, "mhz": round(spec.spectrometer_mhz, 3),
                     "bandwidth_hz": spec.bandwidth_hz, "points": p.points, "dims": p.dims,
                     "naa_ppm": round(peak_ppm(canon), 3)})
        log(f"      {rows[-1]['file']:<42} {str(p.vendor):<8} {rows[-1]['mhz']:>8} MHz  NAA {rows[-1]['naa_ppm']} ppm")
        img = transform(select_channels(torch.from_numpy(canon.fid), canon.sub, channels)).numpy()
        plot_spectrum_and_spectrogram(canon, img, channels, transform.cfg, grid, out / f"inspect_{Path(p.source).name.replace('.', '_')}.png")
    for err in errors:
        log(f"      skipped {err}")
    (out / "inspect.json").write_text(json.dumps(rows, indent=1))

    log(f"[2/3] simulating {n_sim} spectra per profile {list(cfg.data.sim_profiles)} on {device}")
    n_files = 0
    for i, profile in enumerate(cfg.data.sim_profiles):
        n_files += len(write_simulated(profile, n_sim, out / "simulated" / profile, seed=cfg.seed + i, grid=grid, device=device))

    log("[3/3] drawing mixed in vivo + simulated training batches")
    stream = build_stream(cfg.data, seed=cfg.seed, device=device, invivo_dir=SHIPPED_INVIVO)
    tb = time.perf_counter()
    steps = 3
    for batch in stream(0, steps):
        pass
    rate = steps * stream.batch_size / (time.perf_counter() - tb)
    _save_batch_png(batch.x, batch.vendor, batch.invivo, out / "batch.png")
    summary = {"real_files": len(rows), "bad_files": [str(e) for e in errors], "simulated_files": n_files,
               "batch_shape": list(batch.x.shape), "batches_per_s": round(rate / stream.batch_size, 2),
               "spectrograms_per_s": round(rate, 1), "device": str(device),
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"done in {summary['seconds']} s: {summary['real_files']} real files, {n_files} simulated files, "
        f"batches {summary['batch_shape']} at {summary['spectrograms_per_s']} spectrograms/s -> {out}")
    return summary
