"""Data pipeline throughput: simulated spectra turned into spectrograms per second.

Prints JSON lines:
  {"name": "scipy_per_sample", ...}  the straightforward scipy recipe, one spectrum at a time,
                                     one CPU thread (spectrogram only: the cheapest baseline)
  {"name": "torch_cpu", ...}         batched simulation + spectrogram on the CPU
  {"name": "torch_cuda", ...}        the same on the GPU, when there is one
Each torch line carries `speedup_vs_scipy`, measured against the scipy line of the same run.
Usage: python bench/data_throughput.py [--profile megapress_siemens] [--batch 4096] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from mrsfm_model.data.canonical import CanonicalGrid
from mrsfm_model.data.simulate import Simulator, load_profile
from mrsfm_model.data.spectrogram import SpectrogramConfig, SpectrogramTransform, reference_spectrogram
from mrsfm_model.data.spectrum import select_channels


def _rate(fn, n_per_call: int, seconds: float, sync=lambda: None) -> tuple[float, int]:
    fn()  # warm-up (allocations, kernels, caches)
    sync()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    sync()
    return calls * n_per_call / (time.perf_counter() - t0), calls * n_per_call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="megapress_siemens")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--channels", default="OFF,ON,DIFF")
    args = ap.parse_args()
    grid, cfg = CanonicalGrid.from_config(), SpectrogramConfig.from_config()
    channels = args.channels.split(",")
    profile = load_profile(args.profile)

    sim_cpu = Simulator(profile, grid, device="cpu")
    out = sim_cpu.simulate(64, seed=0)
    fids = select_channels(out.fid, out.sub, channels).numpy()
    torch.set_num_threads(1)
    i = iter(range(10**9))
    scipy_rate, n = _rate(lambda: reference_spectrogram(fids[next(i) % len(fids)], cfg, grid), 1, args.seconds)
    print(json.dumps({"name": "scipy_per_sample", "spectrograms_per_s": round(scipy_rate, 1), "threads": 1,
                      "channels": len(channels), "samples": n}), flush=True)
    torch.set_num_threads(os.cpu_count() or 1)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        sim = Simulator(profile, grid, device=dev)
        tr = SpectrogramTransform(cfg, grid)
        batch = args.batch if dev == "cuda" else min(args.batch, 256)
        seeds = iter(range(10**9))

        def step():
            out = sim.simulate(batch, seed=next(seeds))
            return tr(select_channels(out.fid, out.sub, channels))

        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        rate, n = _rate(step, batch, args.seconds, sync)
        rec = {"name": f"torch_{dev}", "spectra_per_s": round(rate, 1), "batch": batch, "samples": n,
               "threads": torch.get_num_threads() if dev == "cpu" else None,
               "speedup_vs_scipy": round(rate / scipy_rate, 2), "profile": args.profile,
               "image": [len(channels), cfg.height, cfg.width]}
        if dev == "cuda":
            rec["gpu"] = torch.cuda.get_device_name()
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
