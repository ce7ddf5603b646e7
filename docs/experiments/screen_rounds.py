"""Screen: does the frozen encoder's probe keep improving with pretraining, or peak early?

Every round checkpoint of some `mrsfm compare` arms (same initial model, 7 680 samples per round),
each probed on the VALIDATION benchmark (seed 1) with the compare panel's linear read-out: vendor
accuracy and NAA/tCr R² at 25 / 50 / 100 labels, 5 paired seeds. Round 0 = the initial model.
Usage: python docs/experiments/screen_rounds.py RUNS/compare_small [arm ...]  (JSON lines on stdout)
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

from mrsfm_model.config import load_config
from mrsfm_model.evaluation.panel import Panel
from mrsfm_model.model.export import export_encoder
from mrsfm_model.model.mae import build_mae
from mrsfm_model.model.weights import load_weights

root = Path(sys.argv[1])
arms = sys.argv[2:] or ["centralized", "federated_fedavg", "single_siemens"]
cfg = load_config(["model=micro", "finetune.benchmark.seed=1", "finetune.seeds=[0,1,2,3,4]"])
panel = Panel(cfg, torch.device("cpu"), ("vendor", "quant"), log=lambda m: None)
tmp = Path(tempfile.mkdtemp())
for arm in arms:
    rounds = sorted((root / "arms" / arm / "run" / "rounds").glob("round_*[0-9].safetensors"))
    for r, ckpt in [(0, None), *[(int(p.stem.split("_")[1]), p) for p in rounds]]:
        torch.manual_seed(cfg.seed)  # the ServerApp's initial model (round 0)
        model = build_mae(cfg.model, cfg.data)
        if ckpt is not None:
            load_weights(model, ckpt)
        enc = export_encoder(model, tmp / f"{arm}_{r}.safetensors")  # (the run's own inputs: no card to check)
        res = {"arm": arm, "round": r}
        for row in panel.score(enc, ("linear",)):
            key = "accuracy" if row["task"] == "vendor" else "r2_NAA/tCr"
            res[f"{row['task']}_{row['n_labels']}"] = round(row["metrics"][key]["mean"], 3)
        print(json.dumps(res), flush=True)
