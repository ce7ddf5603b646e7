"""Training data: a site's private in vivo folder mixed with the shared simulated stream.

Batches are produced whole (simulation and STFT run batched on the model's device), and each
batch is a pure function of (seed, step), so a run is reproducible and resumable, and the
central trainer and the federated client draw exactly the same way. In vivo and simulated
parts can also be drawn apart (`invivo_batch`, `sim_batch`): differential privacy needs the
private data in its own sampler.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrsfm_model.data.canonical import CanonicalGrid, to_canonical
from mrsfm_model.data.io import load_folder, load_spectrum
from mrsfm_model.data.latents import NAMES as LATENT_NAMES
from mrsfm_model.data.latents import latent_targets
from mrsfm_model.data.quality import QualityConfig, measure
from mrsfm_model.data.simulate import Simulator, load_profile
from mrsfm_model.data.spectrogram import SpectrogramConfig, SpectrogramTransform
from mrsfm_model.data.spectrum import VENDORS, Spectrum, select_channels
from mrsfm_model.errors import MRSDataError


def vendor_index(vendor: str | None) -> int:
    """Class index of a vendor in VENDORS, -1 when unknown."""
    return VENDORS.index(vendor) if vendor in VENDORS else -1


@dataclass
class Batch:
    x: torch.Tensor  # (B, C, H, W) spectrograms
    vendor: torch.Tensor  # (B,) index into VENDORS, -1 unknown
    invivo: torch.Tensor  # (B,) bool: drawn from the private in vivo set
    target: torch.Tensor | None = None  # (B, C, H, W) what the MAE reconstructs (data.denoise); None: x
    latents: torch.Tensor | None = None  # (B, len(latents.NAMES)) simulator truth; NaN rows for in vivo


@dataclass
class Prepared:
    """One spectrum turned into model inputs: the image, the canonical channel FIDs (for the
    non-deep baseline) and the canonical spectrum itself."""

    image: torch.Tensor  # (C, H, W)
    fids: np.ndarray  # (C, points) complex, canonical grid
    canonical: Spectrum


class InputBuilder:
    """The one recipe from a loaded spectrum to a model input: to_canonical -> select_channels ->
    SpectrogramTransform. Pretraining, fine-tuning, prediction and `mrsfm inspect` all use it,
    and a study model stores its settings (`to_dict`) so that prediction rebuilds the same inputs."""

    def __init__(self, grid: CanonicalGrid, spec_cfg: SpectrogramConfig, channels: Sequence[str]):
        self.grid, self.spec_cfg, self.channels = grid, spec_cfg, list(channels)
        self.transform = SpectrogramTransform(spec_cfg, grid)

    @classmethod
    def from_data_config(cls, data_cfg) -> InputBuilder:
        return cls(CanonicalGrid.from_config(data_cfg.grid), SpectrogramConfig.from_config(data_cfg.spectrogram),
                   list(data_cfg.channels))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputBuilder:
        """Rebuild from `to_dict()` output (stored in a model file)."""
        return cls(CanonicalGrid.from_config(d["grid"]), SpectrogramConfig.from_config(d["spectrogram"]),
                   list(d["channels"]))

    def to_dict(self) -> dict[str, Any]:
        return {"grid": asdict(self.grid), "spectrogram": asdict(self.spec_cfg), "channels": self.channels}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return len(self.channels), self.spec_cfg.height, self.spec_cfg.width

    def canonical(self, spec: Spectrum) -> Spectrum:
        """The spectrum on the canonical grid; a failure is an MRSDataError naming its file."""
        try:
            return to_canonical(spec, self.grid)
        except ValueError as exc:
            raise MRSDataError(spec.provenance.source, str(exc)) from None

    def prepare(self, spec: Spectrum) -> Prepared:
        """Model inputs of one loaded spectrum; any failure is an MRSDataError naming its file."""
        source = spec.provenance.source
        canon = self.canonical(spec)
        try:
            fids = select_channels(torch.from_numpy(canon.fid), canon.sub, self.channels)
        except KeyError:
            raise MRSDataError(source, f"has sub-spectra {list(canon.sub)}; the model needs channels "
                                       f"{self.channels}") from None
        image = self.transform(fids).float()
        if not torch.isfinite(image).all():
            raise MRSDataError(source, "spectrogram contains NaN or Inf values")
        return Prepared(image=image, fids=fids.numpy(), canonical=canon)

    def load(self, path: str | Path) -> Prepared:

        return self.prepare(load_spectrum(path))


class InVivoSet:
    """A site's private folder, loaded once onto the canonical grid and turned into images."""

    def __init__(self, spectra: list[Spectrum], builder: InputBuilder, errors: Sequence[MRSDataError] = (),
                 quality: QualityConfig | None = None):
        """`quality`: the gate (data.quality); a spectrum that fails it is left out and listed in
        `errors` with the reason, like an unreadable file. None: the configured gate."""
        self.errors = list(errors)
        gate = quality or QualityConfig.from_config()
        prepared = []
        for s in spectra:
            try:
                p = builder.prepare(s)
                if why := measure(p.canonical).problem(gate):
                    raise MRSDataError(s.provenance.source or "spectrum", f"{why}; left out")
                prepared.append(p)
            except MRSDataError as exc:  # e.g. sub-spectra the channels cannot be made from
                self.errors.append(exc)
        self.spectra = [p.canonical for p in prepared]
        self.vendor = torch.tensor([vendor_index(s.provenance.vendor) for s in self.spectra], dtype=torch.long)
        self.x = torch.stack([p.image for p in prepared]) if prepared else torch.empty(0)

    @classmethod
    def from_folder(cls, folder: str | Path, builder: InputBuilder, quality: QualityConfig | None = None) -> InVivoSet:

        folder = Path(folder)
        if not folder.is_dir():
            raise MRSDataError(folder, "in vivo data folder does not exist")
        spectra, errors = load_folder(folder)
        return cls(spectra, builder, errors, quality)

    def __len__(self) -> int:
        return len(self.spectra)


class MixedStream:
    """Batches of in vivo + simulated spectrograms, a deterministic function of (seed, step)."""

    def __init__(
        self,
        simulators: Sequence,  # mrsfm_model.data.simulate.Simulator, one per profile
        transform: SpectrogramTransform,
        channels: Sequence[str],
        batch_size: int,
        invivo: InVivoSet | None = None,
        invivo_fraction: float = 0.25,
        seed: int = 0,
        device: torch.device | str = "cpu",
        denoise: bool = False,
        prefetch: int = 0,
        gaba_unedited: bool = False,
    ):
        if not simulators and (invivo is None or len(invivo) == 0):
            raise ValueError("no data: neither simulation profiles nor in vivo spectra")
        self.simulators, self.transform, self.channels = list(simulators), transform, list(channels)
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        # denoising MAE: simulated inputs are reconstructed as their noise-free selves (the same draw
        # with snr = inf); in vivo spectra have no clean version and are their own target
        self.denoise = denoise
        self.prefetch = prefetch
        self.gaba_unedited = gaba_unedited  # ask the latent head for GABA of unedited spectra too
        self.invivo = invivo if invivo is not None and len(invivo) else None
        frac = invivo_fraction if self.invivo is not None else 0.0
        frac = 1.0 if not self.simulators else frac
        self.n_invivo = int(round(batch_size * frac))
        self.n_sim = batch_size - self.n_invivo

    def invivo_batch(self, step: int, k: int | None = None) -> Batch:
        """k private spectra; epochs of seeded permutations, so every spectrum is seen in turn."""
        k = self.n_invivo if k is None else k
        n = len(self.invivo)
        pos = np.arange(step * k, step * k + k)
        idx = np.empty(k, dtype=np.int64)
        for epoch in np.unique(pos // n):
            perm = np.random.default_rng([self.seed, 1, int(epoch)]).permutation(n)
            sel = pos // n == epoch
            idx[sel] = perm[pos[sel] % n]
        idx_t = torch.from_numpy(idx)
        return Batch(
            x=self.invivo.x[idx_t].to(self.device),
            vendor=self.invivo.vendor[idx_t].to(self.device),
            invivo=torch.ones(k, dtype=torch.bool, device=self.device),
            latents=torch.full((k, len(LATENT_NAMES)), float("nan"), device=self.device),
        )

    def sim_batch(self, step: int, k: int | None = None) -> Batch:
        """k simulated spectra split evenly over the profiles, generated on the device."""
        k = self.n_sim if k is None else k
        p = len(self.simulators)
        counts = [k // p + (1 if (i - step) % p < k % p else 0) for i in range(p)]
        xs, vendors, clean, latents = [], [], [], []
        for i, (sim, c) in enumerate(zip(self.simulators, counts)):
            if c == 0:
                continue
            seed = int(np.random.default_rng([self.seed, 2, step, i]).integers(2**31))
            out = sim.simulate(c, seed=seed)
            xs.append(self.transform(select_channels(out.fid, out.sub, self.channels)))
            vendors.append(torch.full((c,), vendor_index(out.vendor), dtype=torch.long, device=self.device))
            latents.append(latent_targets(out.truth, sim.mm_names, edited=len(out.sub) > 1 or self.gaba_unedited))
            if self.denoise:
                ref = sim.simulate(c, seed=seed, fixed={"snr": float("inf")})
                clean.append(self.transform(select_channels(ref.fid, ref.sub, self.channels)))
        return Batch(
            x=torch.cat(xs).to(self.device),
            vendor=torch.cat(vendors).to(self.device),
            invivo=torch.zeros(k, dtype=torch.bool, device=self.device),
            target=torch.cat(clean).to(self.device) if self.denoise else None,
            latents=torch.cat(latents).to(self.device),
        )

    def batch(self, step: int) -> Batch:
        parts = []
        if self.n_invivo:
            parts.append(self.invivo_batch(step))
        if self.n_sim:
            parts.append(self.sim_batch(step))
        x = torch.cat([b.x for b in parts])
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, 3, step]).integers(2**31)))
        order = torch.randperm(x.shape[0], generator=gen).to(self.device)
        target = torch.cat([b.x if b.target is None else b.target for b in parts]) if self.denoise else None
        return Batch(
            x=x[order],
            vendor=torch.cat([b.vendor for b in parts])[order],
            invivo=torch.cat([b.invivo for b in parts])[order],
            target=None if target is None else target[order],
            latents=torch.cat([b.latents for b in parts])[order],
        )

    def __call__(self, start: int = 0, steps: int | None = None, prefetch: int | None = None) -> Iterator[Batch]:
        """Batches `start`, `start + 1`, ... (`steps` of them, or without end). `prefetch` > 0 makes
        them on a background thread, that many ahead, so the model never waits for simulation and
        STFT (the same batches: each is a function of (seed, step) alone); None: the stream's own."""
        steps_ = itertools.count(start) if steps is None else range(start, start + steps)
        prefetch = self.prefetch if prefetch is None else prefetch
        if prefetch <= 0:
            return (self.batch(step) for step in steps_)
        return _ahead(map(self.batch, steps_), prefetch)


def _ahead(items: Iterator, depth: int) -> Iterator:
    """`items`, produced by a daemon thread up to `depth` ahead; an error there is raised here, at
    the item it replaced, and closing the iterator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        # one intra-op thread here (OpenMP's count is per thread): a second full team of threads
        # beside the model's oversubscribed 2 cores and made a tiny step 35 % slower
        torch.set_num_threads(1)
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as exc:  # handed to the consumer
            q.put((done, exc))

    threading.Thread(target=produce, name="batch-prefetch", daemon=True).start()

    def consume() -> Iterator:
        try:
            while True:
                item, exc = q.get()
                if exc is not None:
                    raise exc
                if item is done:
                    return
                yield item
        finally:
            stop.set()

    return consume()


def build_stream(data_cfg, seed: int = 0, device: torch.device | str = "cpu",
                 invivo_dir: str | Path | None = None) -> MixedStream:
    """The stream described by a `configs/data/*.yaml` node (shared by every trainer)."""

    builder = InputBuilder.from_data_config(data_cfg)
    folder = invivo_dir if invivo_dir is not None else data_cfg.get("invivo_dir")
    invivo = InVivoSet.from_folder(folder, builder, QualityConfig.from_config(data_cfg.quality)) if folder else None
    sims = [Simulator(load_profile(p), builder.grid, device=device) for p in data_cfg.sim_profiles]
    return MixedStream(sims, builder.transform, data_cfg.channels, data_cfg.batch_size, invivo,
                       data_cfg.invivo_fraction, seed, device, denoise=bool(data_cfg.denoise),
                       prefetch=int(data_cfg.prefetch), gaba_unedited=bool(data_cfg.gaba_unedited))
