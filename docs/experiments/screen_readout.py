"""Screen 7b: which read-out of a latent-head MAE carries most with few labels? On the VALIDATION
benchmark (seed 1), the same regularised logistic / ridge regression (baseline_metrics) on:
`tokens` (the flat band tokens), `head` (the latent head's predictions of the simulator's truth),
`tokens+head`, and `pixels`; 25/50/100 labels, 5 paired seeds.

    python docs/experiments/screen_readout.py RUN_DIR [RUN_DIR ...]
Appends one JSON line per (run, task, labels) to docs/experiments/screen_readout.jsonl.
"""
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from mrsfm_model.config import load_config  # noqa: E402
from mrsfm_model.evaluation.finetune import baseline_metrics  # noqa: E402
from mrsfm_model.evaluation.panel import Panel, task_metrics  # noqa: E402
from mrsfm_model.evaluation.stats import mean_ci95  # noqa: E402
from mrsfm_model.model.export import init_mae  # noqa: E402
from mrsfm_model.model.mae import SpectroMAE, configured_mae  # noqa: E402

cfg = load_config(["finetune.benchmark.seed=1", "finetune.seeds=[0,1,2,3,4]", "device=cpu"])
panel = Panel(cfg, torch.device("cpu"), tasks=("vendor", "quant"))
bench = panel.tasks[0].bench
l2 = tuple(cfg.finetune.l2)


@torch.no_grad()
def features(run: Path) -> dict[str, torch.Tensor]:
    model = SpectroMAE(configured_mae(_model_cfg(run), cfg.data))
    init_mae(model, run / "mae.safetensors")
    model.eval()
    toks, heads = [], []
    for i in range(0, len(bench.x), 200):
        t = model.encode(bench.x[i:i + 200])[:, 1:].flatten(1)
        toks.append(t)
        heads.append(model.latent_head(t))
    t, h = torch.cat(toks), torch.cat(heads)
    return {"tokens": t, "head": h, "tokens+head": torch.cat([t, h * (t.std() / h.std())], 1),
            "pixels": bench.x.flatten(1)}


def _model_cfg(run: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run / "config.yaml").model, resolve=True)


with open("docs/experiments/screen_readout.jsonl", "a") as fh:
    for run in map(Path, sys.argv[1:]):
        feats = features(run)
        for task in panel.tasks:
            for n in cfg.finetune.label_sizes:
                samples = [task.bench.labelled_sample(int(n), int(s)) for s in cfg.finetune.seeds]
                test = task.bench.test
                kind = "vendor" if task.classification else "quant"
                per = {name: [baseline_metrics(f[idx], task.y[idx], f[test], task.y[test], kind, 3, l2)
                              for idx in samples] for name, f in feats.items()}
                out = {"run": run.name, "task": task.name, "n_labels": int(n)}
                for metric in task_metrics(task.name):
                    for name, rows in per.items():
                        out[f"{metric}:{name}"] = round(sum(r[metric] for r in rows) / len(rows), 3)
                    for name in ("tokens", "tokens+head", "pixels"):
                        d = mean_ci95([a[metric] - b[metric] for a, b in zip(per["head"], per[name])])
                        out[f"{metric}:head-{name}"] = [round(d["mean"], 3), round(d["ci95"], 3)]
                print(json.dumps(out), flush=True)
                fh.write(json.dumps(out) + "\n")
