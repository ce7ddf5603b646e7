"""DP-SGD step throughput against the non-private step, same model and batch.

Prints JSON lines: {"variant": "non_dp" | "dp_hooks" | "dp_ghost" | "dp_ghost_global_rng",
"samples_per_s", "step_ms", "peak_mem_gb"} and `ratio_vs_non_dp` on the DP lines (target: >= 0.5 on
a GPU). All use the project's Trainer; dp_hooks is Opacus per-sample gradients (hooks) + clipping +
noise, dp_ghost Opacus' ghost clipping (per-sample norms only, two backward passes) + noise, both
with the noise from the site's OS-entropy-seeded generator; dp_ghost_global_rng draws the noise from
torch's global generator instead (the old, reproducible source): its line carries
`secure_vs_global` (dp_ghost's rate over it), the cost of the secure source.
Usage: python bench/dp_throughput.py [--size small] [--batch 64] [--steps 10]
On a machine without a GPU it runs a micro model on the CPU so the script stays tested.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mrsfm_model.model.mae import SpectroMAE, mae_config, mae_loss
from mrsfm_model.training.privacy import DPConfig, PrivateSite
from mrsfm_model.training.trainer import OptimConfig, Trainer


def _time(step, steps: int, cuda: bool) -> float:
    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", help="model size (default: small on a GPU, micro on the CPU)")
    ap.add_argument("--batch", type=int, help="batch (default: 64 on a GPU, 16 on the CPU)")
    ap.add_argument("--steps", type=int, help="timed steps (default: 10 on a GPU, 3 on the CPU)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    size, batch, steps = ("small", 64, 10) if cuda else ("micro", 16, 3)
    size, batch, steps = args.size or size, args.batch or batch, args.steps or steps
    results = {}
    for variant in ("non_dp", "dp_hooks", "dp_ghost", "dp_ghost_global_rng"):
        torch.manual_seed(0)
        model = SpectroMAE(mae_config(size))
        trainer = Trainer(model, mae_loss, OptimConfig.from_config(amp="none"), 1000, batch, device, progress=False)
        x = torch.randn(batch, 3, *model.cfg.img_size, device=device)
        if variant == "non_dp":
            step = lambda: trainer.train_step(x)  # noqa: E731
        else:
            clipping = "flat" if variant == "dp_hooks" else "ghost"
            site = PrivateSite(trainer, torch.randn(batch * 4, 3, *model.cfg.img_size), DPConfig.from_config(
                enabled=True, noise_multiplier=1.0, batch_size=batch, clipping=clipping))
            if variant == "dp_ghost_global_rng":
                site.dp_optimizer.generator = None  # Opacus then draws from torch's global generator
            step = lambda: site.private_step(x)  # noqa: E731  (fixed batch: time the step, not sampling)
        dt = _time(step, steps, cuda)
        results[variant] = batch / dt
        rec = {"variant": variant, "size": size, "batch": batch, "samples_per_s": round(batch / dt, 1),
               "step_ms": round(dt * 1000, 1), "device": torch.cuda.get_device_name() if cuda else "cpu",
               "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        if variant != "non_dp":
            rec["ratio_vs_non_dp"] = round(results[variant] / results["non_dp"], 3)
        if variant == "dp_ghost_global_rng":
            rec["secure_vs_global"] = round(results["dp_ghost"] / results[variant], 3)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
