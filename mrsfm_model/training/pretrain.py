"""`mrsfm pretrain`: central MAE pretraining on simulated + in vivo spectrograms.

Everything lands under `cfg.run_dir`: checkpoints/last (resume point), metrics.jsonl,
training_curve.png, reconstruction.png (original / masked / reconstructed, in vivo and
simulated, like the seed's Figure 4), encoder.safetensors + encoder.json (model card), and
mae.safetensors (encoder + decoder: `init=RUN_DIR/mae.safetensors` continues from it). A run
starts from random weights, or from `init` (a file, or `shipped`: the packaged model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mrsfm_model.config import resolve_device
from mrsfm_model.data.stream import build_stream
from mrsfm_model.logs import Log, get_logger
from mrsfm_model.model.export import export_encoder, init_mae, save_mae
from mrsfm_model.model.mae import SpectroMAE, build_mae, mae_loss
from mrsfm_model.reports.cards import pretraining_card
from mrsfm_model.training.monitor import Scalars
from mrsfm_model.training.trainer import OptimConfig, Trainer

_log = get_logger("training")


def plot_curve(metrics_path: Path, out: Path) -> Path:
    from mrsfm_model.reports.plots import plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("pretraining loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@torch.no_grad()
def plot_reconstructions(model: SpectroMAE, examples: dict[str, torch.Tensor], out: Path, seed: int = 0) -> Path:
    """One row per example: original, masked input, reconstruction (channel 0)."""
    from mrsfm_model.reports.plots import plt, show_spectrogram

    model.eval()
    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 2.8 * len(examples)), squeeze=False)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for row, (name, x) in enumerate(examples.items()):
        x = x[None].to(next(model.parameters()).device)
        _, pred, mask, _ = model(x, generator=gen)
        recon = model.reconstruct(x, pred, mask)[0, 0].float().cpu().numpy()
        pm = mask[0].unsqueeze(-1).expand(-1, int(np.prod(model.cfg.patch_size)) * model.cfg.in_chans)
        masked = model.unpatchify(model.patchify(x) * (1 - pm))[0, 0].float().cpu().numpy()
        masked[masked == 0] = np.nan
        original = x[0, 0].float().cpu().numpy()
        lim, signed = float(np.percentile(np.abs(original), 99.5)), bool(original.min() < 0)
        for col, (title, img) in enumerate([("original", original), ("masked", masked), ("reconstructed", recon)]):
            ax = axes[row, col]
            show_spectrogram(ax, img, lim, signed=signed)  # one colour scale per row: the original's
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_pretrain(cfg: DictConfig, log: Log = _log.info) -> dict:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    stream = build_stream(cfg.data, seed=cfg.seed, device=device)
    if stream.invivo is not None:
        for err in stream.invivo.errors:
            log(f"skipped {err}")
        log(f"in vivo: {len(stream.invivo)} spectra from {cfg.data.invivo_dir}")
    model = build_mae(cfg.model, cfg.data)
    steps = int(cfg.train.steps)
    trainer = Trainer(model, mae_loss, OptimConfig.from_config(cfg.train), steps, stream.batch_size, device, run_dir)
    ckpt = run_dir / "checkpoints" / "last"
    if (ckpt / "trainer.pt").exists():
        trainer.load(ckpt)
        log(f"resumed from {ckpt} at step {trainer.step}")
    elif cfg.get("init"):
        log(f"starting from {init_mae(model, cfg.init)}")
    trainer.scalars = Scalars(run_dir, bool(cfg.train.tensorboard), resume_step=trainer.step)
    every = int(cfg.train.checkpoint_every) or steps
    last: dict = {}
    while trainer.step < steps:
        n = min(every, steps - trainer.step)
        last = trainer.fit(stream(trainer.step, n), n, log_every=int(cfg.train.log_every), desc="pretrain")
        trainer.save(ckpt)
        log(f"step {trainer.step}/{steps} loss {last.get('loss', float('nan')):.4f} -> {ckpt}")
    examples = {"simulated": stream.sim_batch(10**6, k=len(stream.simulators) or 1).x[0]}
    if stream.invivo is not None:
        examples = {"in vivo": stream.invivo.x[0], **examples}
    plot_reconstructions(model, examples, run_dir / "reconstruction.png", seed=cfg.seed)
    if (run_dir / "metrics.jsonl").exists():
        plot_curve(run_dir / "metrics.jsonl", run_dir / "training_curve.png")
    card = pretraining_card(cfg, last.get("loss"), trained_steps=trainer.step, batch_size=stream.batch_size)
    card["data"]["invivo_spectra"] = 0 if stream.invivo is None else len(stream.invivo)
    export_encoder(model, run_dir / "encoder.safetensors", card)
    save_mae(model, run_dir / "mae.safetensors")
    trainer.scalars.close()
    log(f"encoder -> {run_dir / 'encoder.safetensors'}")
    return card
