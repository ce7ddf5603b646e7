"""MAE pretraining step throughput: the project's Trainer vs a reference-style step.

Prints one JSON line per (configuration, variant):
  config  vit_b16_224: ViT-B/16 MAE at 224x224, 3 channels (the classic MAE setting)
          spectrogram:  the default spectrogram configuration (configs/: 3x64x32, the configured patches)
  variant reference: fp16 autocast + GradScaler, eager, unfused attention, foreach AdamW
                     (how facebookresearch/mae runs)
          project:   the project's Trainer: bf16 autocast, fused SDPA attention, fused AdamW
          project_compiled: the same with torch.compile
Fields: samples_per_s, tflops (model FLOPs per step counted by torch's FlopCounterMode / step
time), peak_mem_gb, speedup_vs_reference (same config, same run), and a `matmul_peak` line with
the measured dense bf16 matmul TFLOP/s, with `fraction_of_matmul_peak` per line.
On a machine without a GPU it runs a micro model on the CPU so the script itself stays tested.
Usage: python bench/pretrain_throughput.py [--batch 256] [--steps 20] [--size base]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mrsfm_model.config import load_config
from mrsfm_model.model.mae import SpectroMAE, mae_config, mae_loss
from mrsfm_model.training.trainer import OptimConfig, Trainer


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _set_fused_attn(model: torch.nn.Module, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def measure(cfg_kwargs: dict, variant: str, batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = SpectroMAE(mae_config(**cfg_kwargs))
    cuda = device.type == "cuda"
    if variant == "reference":
        _set_fused_attn(model, False)
        opt_cfg = OptimConfig.from_config(amp="fp16" if cuda else "none", compile=False, warmup_steps=5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    else:
        opt_cfg = OptimConfig.from_config(amp="bf16" if cuda else "none", compile=variant.endswith("compiled"), warmup_steps=5)
        optimizer = None
    trainer = Trainer(model, mae_loss, opt_cfg, steps + 10, batch, device, progress=False,
                      optimizer=optimizer)
    x = torch.randn(batch, model.cfg.in_chans, *model.cfg.img_size, device=device)
    for _ in range(3 if not opt_cfg.compile else 5):  # warm-up (and compilation)
        trainer.train_step(x)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(x)
    flops = counter.get_total_flops()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"samples_per_s": round(batch / dt, 1), "tflops": round(flops / dt / 1e12, 2),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "step_ms": round(dt * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", default="base")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, batch, steps = (args.size, args.batch, args.steps) if device.type == "cuda" else ("micro", 8, 2)
    cfg = load_config([])
    data = cfg.data
    configs = {
        "vit_b16_224": dict(size=size, img_size=(224, 224), patch_size=(16, 16), in_chans=3),
        "spectrogram": dict(size=size, img_size=(data.spectrogram.height, data.spectrogram.width),
                            patch_size=tuple(cfg.model.patch_size), in_chans=len(data.channels)),
    }
    peak = matmul_peak(device) if device.type == "cuda" else None
    print(json.dumps({"name": "matmul_peak", "bf16_tflops": peak and round(peak, 1),
                      "device": torch.cuda.get_device_name() if peak else "cpu"}), flush=True)
    variants = ["reference", "project"] + ([] if args.no_compile or device.type != "cuda" else ["project_compiled"])
    for name, kw in configs.items():
        ref = None
        for variant in variants:
            rec = measure(kw, variant, batch, steps, device)
            ref = ref or rec["samples_per_s"]
            rec.update(name=name, variant=variant, size=size, batch=batch,
                       speedup_vs_reference=round(rec["samples_per_s"] / ref, 2),
                       fraction_of_matmul_peak=round(rec["tflops"] / peak, 3) if peak else None)
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
