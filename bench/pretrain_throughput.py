"""The real pretraining step's throughput: `mrsfm pretrain` (data, MAE, latent head, AdamW) timed
from its own metrics.jsonl, before and after the CPU work, fp32 and bf16.

Prints one JSON line per (size, variant):
  variant before: the settings the step had before it was made cheaper (fp32, timm's fused
                  attention, the latent pass on every simulated spectrum, batches made on the
                  training thread); the STFT over the kept frames only applies to every variant
          fp32:   the configured step in fp32 (the latent pass on `model.latent_fraction` of the
                  simulated rows, batches prefetched on a background thread, attention auto)
          all_rows: fp32 with the latent pass on every row (what prefetching and the attention
                  path alone change; not timed by default)
          bf16:   the same under bf16 autocast; run only where the device has bf16 in hardware
                  (AMX / AVX512-BF16 CPU, GPU) or with --bf16 (on other CPUs bf16 is emulated and
                  ~10-26x slower: the line then says so)
          default: `amp: auto` (whichever of the two the device gets)
Fields: steps_per_s (steps after the first logging window / their seconds), speedup_vs_before
(same size, same run), loss_curve (mean loss per 50-step window: the variants should agree within
noise), device, native_bf16. A `matmul` line gives the device's dense fp32 and bf16 GFLOP/s.
With --same-objective every variant trains the old objective (latent targets unbalanced, GABA asked
of unedited PRESS), so the loss curves measure only what the cheaper step changed (the latent pass
on a fraction of the rows, prefetching, attention path); a `loss_agreement` line then gives the
largest relative difference between `before`'s and `fp32`'s 50-step windows.
Usage: python bench/pretrain_throughput.py [--sizes micro,tiny] [--steps 200] [--batch 64] [--bf16]
       [--variants before,fp32] [--same-objective]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mrsfm_model.config import load_config, resolve_device
from mrsfm_model.training.pretrain import run_pretrain
from mrsfm_model.training.trainer import native_bf16

VARIANTS = {
    "before": ["train.amp=none", "train.attention=fused", "model.latent_fraction=1.0", "data.prefetch=0"],
    "fp32": ["train.amp=none"],
    "all_rows": ["train.amp=none", "model.latent_fraction=1.0"],  # fp32's step with the latent pass on every row
    "bf16": ["train.amp=bf16"],
    "default": [],
}
OLD_OBJECTIVE = ["model.latent_balanced=false", "data.gaba_unedited=true"]


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * calls / (time.perf_counter() - t0) / 1e9


def run(size: str, variant: str, steps: int, batch: int, device: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        over = [f"model={size}", f"data.batch_size={batch}", f"train.steps={steps}", "train.log_every=10",
                f"train.checkpoint_every={steps}", "train.tensorboard=false", f"run_dir={tmp}", f"device={device}",
                "seed=0", *VARIANTS[variant], *extra]
        run_pretrain(load_config(over), log=lambda msg: None)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]  # `seconds` counts from the start of the fit call
    rate = (last["step"] - first["step"]) / (last["seconds"] - first["seconds"])
    curve = [round(sum(r["loss"] for r in rows[i:i + 5]) / len(rows[i:i + 5]), 4) for i in range(0, len(rows), 5)]
    return {"steps_per_s": round(rate, 3), "final_loss": round(last["loss"], 4), "loss_curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="micro,tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bf16", action="store_true", help="also time bf16 where it is emulated")
    ap.add_argument("--variants", default="before,fp32,bf16,default", help="which of " + ",".join(VARIANTS))
    ap.add_argument("--same-objective", action="store_true", help="every variant trains the old objective")
    args = ap.parse_args()
    device = resolve_device(args.device)
    native = native_bf16(device)
    print(json.dumps({"name": "matmul", "device": str(device), "native_bf16": native,
                      "fp32_gflops": round(matmul_gflops(device, torch.float32), 1),
                      "bf16_gflops": round(matmul_gflops(device, torch.bfloat16), 1)}), flush=True)
    for size in args.sizes.split(","):
        before, curves = None, {}
        for variant in args.variants.split(","):
            rec = {"name": "pretrain_step", "size": size, "variant": variant, "batch": args.batch,
                   "steps": args.steps, "device": str(device), "native_bf16": native}
            if variant == "bf16" and not (native or args.bf16):
                print(json.dumps({**rec, "skipped": "bf16 is emulated on this device (--bf16 times it anyway)"}))
                continue
            rec.update(run(size, variant, args.steps, args.batch, args.device,
                           OLD_OBJECTIVE if args.same_objective else []))
            rec["objective"] = "old" if args.same_objective else "configured"
            curves[variant] = rec["loss_curve"]
            before = before or rec["steps_per_s"]
            rec["speedup_vs_before"] = round(rec["steps_per_s"] / before, 2)
            print(json.dumps(rec), flush=True)
        for variant, curve in curves.items():
            if variant == "before" or "before" not in curves:
                continue
            rel = [abs(a - b) / abs(a) for a, b in zip(curves["before"], curve)]
            print(json.dumps({"name": "loss_agreement", "size": size, "variant": variant, "vs": "before",
                              "steps": args.steps, "objective": "old" if args.same_objective else "configured",
                              "max_rel_diff": round(max(rel), 4), "mean_rel_diff": round(sum(rel) / len(rel), 4),
                              "windows": len(rel)}), flush=True)


if __name__ == "__main__":
    main()
