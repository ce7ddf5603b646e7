"""The one training loop: central pretraining, the federated client and fine-tuning all use it.

AdamW with MAE's settings (betas 0.9/0.95, weight decay 0.05 except norms, biases and
tokens, lr = base_lr * batch / 256), linear warmup + cosine decay, bf16 autocast where the
device computes bf16 natively (`native_bf16`), the attention kernel chosen per device, optional torch.compile, gradient clipping, a progress bar, metrics as JSON lines, and
checkpoints (weights in safetensors, optimizer + schedule state beside them) for resume.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mrsfm_model.config import ConfigSection
from mrsfm_model.files import atomic_path
from mrsfm_model.model.weights import load_weights, save_weights
from mrsfm_model.training.monitor import Scalars

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class OptimConfig(ConfigSection):
    """The optimiser's settings; values (and their reasons) in configs/train/default.yaml."""

    SECTION = "train"
    blr: float  # base learning rate for batch 256
    lr: float | None  # absolute learning rate; overrides blr
    weight_decay: float
    betas: tuple[float, float]
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float | None
    amp: str  # auto (bf16 where native_bf16, else fp32) | bf16 | fp16 | none
    attention: str  # auto | fused (timm's F.scaled_dot_product_attention) | math (matmul + softmax)
    compile: bool
    layer_decay: float | None  # layer-wise lr decay (fine-tuning)

    def check(self) -> None:
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"config train.amp: expected auto|bf16|fp16|none, got {self.amp!r}")
        if self.attention not in ("auto", "fused", "math"):
            raise ValueError(f"config train.attention: expected auto|fused|math, got {self.attention!r}")


def native_bf16(device: torch.device) -> bool:
    """Does `device` compute bf16 matmuls in hardware? CUDA GPUs from Ampere on; CPUs with AMX or
    AVX512-BF16. Elsewhere bf16 is emulated: a tiny MAE step took 26x longer in bf16 than in fp32
    on an AVX2-only CPU (docs/EXPERIMENTS.md, screen 14)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return False


@functools.cache
def bf16_agrees(device: torch.device) -> bool:
    """Do `device`'s bf16 kernels give what fp32 gives on a ViT block (both attention paths, 33
    tokens as the encoder sees)? A non-finite or far-off bf16 result was reported from an AMX CPU;
    `amp: auto` then stays in fp32 and says so, rather than training on NaN."""
    from timm.models.vision_transformer import Block

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 33, 192, generator=gen).to(device)
    block = Block(192, 3, qkv_bias=True).to(device).eval()
    ok = True
    for fused in (True, False):
        block.attn.fused_attn = fused
        with torch.no_grad():
            ref = block(x)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                low = block(x).float()
        ok &= bool(torch.isfinite(low).all()) and float((low - ref).abs().max()) < 0.1 * float(ref.abs().max())
    return ok


def resolve_precision(amp: str, attention: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, fused attention?) for the configured `amp` and `attention` on `device`.
    auto: bf16 only where it is native and agrees with fp32 (`bf16_agrees`); the fused attention
    kernel except for bf16 on a CPU, where it was slower than the plain matmul path (tiny MAE step
    0.80 vs 0.47 s, AMX CPU); in fp32 on an AVX2 CPU the two were level (bench/pretrain_throughput.py)."""
    if amp == "auto":
        amp = "bf16" if native_bf16(device) else "none"
        if amp == "bf16" and not bf16_agrees(device):
            warnings.warn(f"bf16 on {device} disagrees with fp32 on a ViT block: training in fp32", stacklevel=2)
            amp = "none"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    if attention == "auto":
        attention = "math" if device.type == "cpu" and dtype is not None else "fused"
    return dtype, attention == "fused"


def set_fused_attention(model: nn.Module, fused: bool) -> None:
    """Point every timm attention layer of `model` at the fused kernel or at the matmul path."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


@dataclass(frozen=True)
class StepPolicy:
    """What one optimisation step runs: the module called forward, the optimizer stepped, the loss
    and the gradient clipping. The Trainer has its own (`plain_step`); a collaborator hands another
    to `train_step` instead of rewiring the Trainer (DP-SGD: the Opacus-wrapped module and
    optimizer, per-sample clipping inside, so no global clip)."""

    forward: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    grad_clip: float | None


def _layer_id(name: str, n_layers: int) -> int:
    """0 for embeddings/tokens, i+1 for encoder block i, n_layers+1 for everything after."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return n_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """No decay for 1-D tensors (norms, biases) and tokens; optional layer-wise lr scale."""
    n_layers = len(getattr(model, "blocks", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or "token" in name
        layer = _layer_id(name, n_layers) if layer_decay else 0
        scale = layer_decay ** (n_layers + 1 - layer) if layer_decay else 1.0
        g = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale})
        g["params"].append(p)
    return list(groups.values())


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Owns model, optimizer, schedule and step counter; `fit` runs the shared loop."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        cfg: OptimConfig,
        total_steps: int,
        batch_size: int,
        device: torch.device | str = "cpu",
        run_dir: str | Path | None = None,
        progress: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.loss_fn, self.cfg, self.total_steps = loss_fn, cfg, total_steps
        self.lr = cfg.lr if cfg.lr is not None else cfg.blr * batch_size / 256
        cuda = self.device.type == "cuda"
        self.optimizer = optimizer or torch.optim.AdamW(
            param_groups(model, cfg.weight_decay, cfg.layer_decay), lr=self.lr, betas=cfg.betas, fused=cuda
        )
        self.amp_dtype, fused = resolve_precision(cfg.amp, cfg.attention, self.device)
        set_fused_attention(model, fused)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.forward_model = torch.compile(model) if cfg.compile else model
        self.step = 0
        self.run_dir = Path(run_dir) if run_dir else None
        self.progress = progress
        self.scalars: Scalars | None = None  # TensorBoard beside metrics.jsonl, when a run wants it
        self._bar = None  # one progress bar over the whole run, across `fit` calls

    # -- the one training step ---------------------------------------------------------------
    def _set_lr(self) -> float:
        factor = warmup_cosine(self.step, self.cfg.warmup_steps, self.total_steps, self.cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr * factor * g.get("lr_scale", 1.0)
        return self.lr * factor

    def plain_step(self) -> StepPolicy:
        """The Trainer's own step: its model, AdamW, loss and gradient clipping."""
        return StepPolicy(self.forward_model, self.optimizer, self.loss_fn, self.cfg.grad_clip)

    def train_step(self, batch: Any, policy: StepPolicy | None = None) -> dict[str, float | torch.Tensor]:
        """One optimisation step, the Trainer's own or `policy`'s (a collaborator such as DP-SGD
        passes its private step; the schedule, precision and step count stay the Trainer's).
        Loss and gradient norm come back as device tensors: reading them (a GPU sync) is left
        to `fit`'s logging, so the GPU is never stalled per step."""
        p = policy or self.plain_step()
        self.model.train()
        lr = self._set_lr()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, metrics = p.loss_fn(p.forward, batch)
        p.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(p.optimizer)
        else:
            loss.backward()
        grad_norm = None
        if p.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), p.grad_clip)
        if self.scaler is not None:
            self.scaler.step(p.optimizer)
            self.scaler.update()
        else:
            p.optimizer.step()
        self.step += 1
        out = {"step": self.step, "loss": loss.detach(), "lr": lr, **metrics}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        return out

    # -- the loop ------------------------------------------------------------------------------
    def fit(
        self,
        batches: Iterable,
        steps: int,
        log_every: int = 10,
        on_log: Callable[[dict], None] | None = None,
        desc: str = "train",
    ) -> dict[str, float]:
        """Run `steps` steps from `batches`; log a mean every `log_every` steps; return the last mean.
        The progress bar counts to `total_steps` over every call (a run saved in chunks, resumed)."""
        if self._bar is None:
            self._bar = tqdm(total=self.total_steps, initial=self.step, desc=desc, disable=not self.progress,
                             dynamic_ncols=True)
        bar = self._bar
        window: list[dict] = []
        last: dict[str, float] = {}
        t0 = time.perf_counter()
        it = iter(batches)
        for i in range(steps):
            window.append(self.train_step(next(it)))
            bar.update(1)
            if len(window) == log_every or i == steps - 1:
                keys = [k for k in window[-1] if k != "step" and isinstance(window[-1][k], (int, float, torch.Tensor))]
                last = {k: float(sum(float(w[k]) for w in window if k in w) / len(window)) for k in keys}
                last.update(step=self.step, seconds=round(time.perf_counter() - t0, 3))
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                self.log(last)
                if on_log:
                    on_log(last)
                window = []
        if self.step >= self.total_steps:
            bar.close()
            self._bar = None
        return last

    def log(self, record: dict) -> None:
        if self.scalars is not None:
            self.scalars.add({k: v for k, v in record.items() if k not in ("step", "seconds")}, record["step"], "train")
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """model.safetensors + trainer.pt (optimizer, scaler, step) in `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(self.model, directory / "model.safetensors", extra)
        state = {"optimizer": self.optimizer.state_dict(), "step": self.step, "cpu_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        with atomic_path(directory / "trainer.pt") as tmp:
            torch.save(state, tmp)
        return directory

    def load(self, directory: str | Path) -> None:
        directory = Path(directory)
        load_weights(self.model, directory / "model.safetensors")
        state = torch.load(directory / "trainer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        torch.set_rng_state(state["cpu_rng"].cpu())  # masking draws continue as if never stopped
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
