"""Screen 7: pretrain a variant (skipped when its encoder exists), then score it with the comparison's
Panel on the VALIDATION benchmark (seed 1): vendor accuracy and GABA/NAA R2, linear probe, 25/50/100
labels, 5 paired seeds, beside a reference encoder, the random-init control and the pixel baseline.

    python docs/experiments/screen_latent.py NAME STEPS [REF_ENCODER] -- [overrides]
Appends one JSON line per (task, labels) to docs/experiments/screen_latent.jsonl.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from mrsfm_model.config import load_config  # noqa: E402
from mrsfm_model.evaluation.networks import RANDOM_INIT  # noqa: E402
from mrsfm_model.evaluation.panel import Panel, task_metrics  # noqa: E402
from mrsfm_model.evaluation.stats import mean_ci95  # noqa: E402
from mrsfm_model.training.pretrain import run_pretrain  # noqa: E402

args = sys.argv[1:]
cut = args.index("--") if "--" in args else len(args)
name, steps, *ref = args[:cut]
over = args[cut + 1:]
run = Path("runs/experiments") / name
cfg = load_config([*over, f"train.steps={steps}", f"run_dir={run}", "device=cpu", "train.checkpoint_every=500",
                   "train.log_every=50", "finetune.benchmark.seed=1", "finetune.seeds=[0,1,2,3,4]"])
enc = run / "encoder.safetensors"
t0 = time.time()
if not enc.exists():
    run_pretrain(cfg, log=lambda m: None)
tp = time.time() - t0
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
panel = Panel(cfg, torch.device("cpu"), tasks=("vendor", "quant"))
arms = {"pretrained": enc, "random_init": RANDOM_INIT, **({"reference": Path(ref[0])} if ref else {})}
scores = {arm: panel.score(path) for arm, path in arms.items()}
scores["pixels"] = panel.baselines()["pixels"]
with open("docs/experiments/screen_latent.jsonl", "a") as fh:
    for i, row in enumerate(scores["pretrained"]):
        out = {"name": name, "steps": int(steps), "over": over, "pretrain_s": round(tp, 1),
               "loss_last": rows[-1]["loss"], "latent_loss_last": rows[-1].get("latent_loss"),
               "task": row["task"], "n_labels": row["n_labels"], "reference": ref[0] if ref else None}
        for metric in task_metrics(row["task"]):
            mine = [s[metric] for s in row["per_seed"]]
            for arm in scores:
                other = [s[metric] for s in scores[arm][i]["per_seed"]]
                out[f"{metric}:{arm}"] = round(sum(other) / len(other), 3)
                if arm != "pretrained":
                    d = mean_ci95([a - b for a, b in zip(mine, other)])
                    out[f"{metric}:pretrained-{arm}"] = [round(d["mean"], 3), round(d["ci95"], 3)]
        print(json.dumps(out), flush=True)
        fh.write(json.dumps(out) + "\n")
