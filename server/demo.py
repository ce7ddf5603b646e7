"""`mrsfm demo`: the main job on a fresh machine, on the files this repository ships.

A real local federation (a SuperLink and three SuperNodes, one per hospital, as processes on
loopback; each site with its own private data: real Philips files, real Siemens files,
simulated GE spectra) continues pretraining the shipped micro MAE for a few rounds, as a new
group of hospitals would; the aggregated encoder is then fine-tuned on the vendor benchmark
against the same MAE encoder at its random initialisation, timm's from-scratch ViT and the two
non-deep baselines. Everything lands under one folder; every process started is stopped, also
on Ctrl-C or error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mrsfm_model.config import load_config, resolve_device
from mrsfm_model.data.stream import build_stream
from mrsfm_model.evaluation.finetune import run_benchmark
from mrsfm_model.logs import Log, get_logger
from mrsfm_model.model.mae import build_mae
from mrsfm_model.model.weights import load_weights
from mrsfm_model.training.pretrain import plot_reconstructions
from server.example_sites import SHIPPED_INVIVO
from server.local import run_local_federation

_log = get_logger("server")

# the rounds start from the shipped model and adapt it to the sites' spectra (the loss falls over the rounds):
# central check on the real Philips files, 30 steps of batch 16: lr 3e-4 1.18 -> 0.73, lr 1e-3 1.88 -> 0.94
DEMO_MODEL = ["model=micro", "init=shipped", "data.batch_size=16", "train.lr=3e-4", "train.warmup_steps=0"]
# few labels, few seeds, short schedules: the demo shows the workflow in minutes on 2 CPU cores;
# `mrsfm finetune` with the defaults is the real benchmark
DEMO_FINETUNE = ["finetune.tasks=[vendor]", "finetune.modes=[linear,full]", "finetune.label_sizes=[30,90]",
                 "finetune.seeds=[0,1,2]", "finetune.steps=100", "finetune.benchmark.subjects_per_vendor=40"]


def _figures(run_dir: Path, out: Path, cfg, device: torch.device) -> None:
    """Training curve over rounds and the reconstruction figure of the global model."""
    from mrsfm_model.reports.plots import plt

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["round"] for r in rows], [r["loss"] for r in rows], marker="o", label="aggregated")
    for site in sorted({s["site"] for r in rows for s in r.get("sites", [])}):
        pts = [(r["round"], s["loss"]) for r in rows for s in r.get("sites", []) if s["site"] == site]
        ax.plot(*zip(*pts), marker=".", ls=":", label=site)
    ax.set_xlabel("round")
    ax.set_ylabel("pretraining loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training_curve.png", dpi=110)
    plt.close(fig)

    model = build_mae(cfg.model, cfg.data)
    last = sorted((run_dir / "rounds").glob("round_*[0-9].safetensors"))[-1]
    load_weights(model, last)
    stream = build_stream(cfg.data, seed=cfg.seed, device="cpu",
                          invivo_dir=SHIPPED_INVIVO / "philips")
    examples = {"in vivo (Philips)": stream.invivo.x[0], "simulated": stream.sim_batch(10**6, k=1).x[0]}
    plot_reconstructions(model.to(device), examples, out / "reconstruction.png", seed=cfg.seed)


def run_demo(out: str | Path, overrides: Sequence[str] = (), rounds: int = 3, local_steps: int = 10,
             log: Log = _log.info) -> dict:


    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    overrides = [*DEMO_MODEL, *overrides]
    fed = run_local_federation(out, rounds=rounds, local_steps=local_steps, overrides=overrides, log=log)
    run_dir = Path(fed["run_dir"])
    cfg = load_config([*overrides, *DEMO_FINETUNE, "device=cpu"])
    device = resolve_device(cfg.device)
    log("figures: training_curve.png, reconstruction.png")
    _figures(run_dir, out, cfg, device)
    log("fine-tuning the aggregated encoder on the vendor benchmark beside its random-init twin, a ViT from "
        "scratch and the non-deep baselines")
    result = run_benchmark(cfg, run_dir / "encoder.safetensors", out, device, log=log)
    first, final = fed["rounds"][0]["loss"], fed["rounds"][-1]["loss"]
    summary = {"seconds": round(time.perf_counter() - t0, 1), "rounds": len(fed["rounds"]), "init": "shipped",
               "first_loss": first, "final_loss": final, "loss_drop": round(1 - final / first, 4),
               "run_dir": str(run_dir),
               "checkpoints": sorted(p.name for p in (run_dir / "rounds").glob("round_*[0-9].safetensors")),
               "finetune": str(out / "finetune.json"), "test_spectra": result["test_spectra"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"done in {summary['seconds']} s -> {out} (run/: checkpoints, metrics.jsonl, encoder; finetune.json, "
        f"finetune.png, training_curve.png, reconstruction.png, logs/)")
    return summary
