"""Screen: pretrain a variant for S steps, then probe frozen tokens on the VALIDATION benchmark (seed 1)."""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from mrsfm_model.config import load_config
from mrsfm_model.evaluation.study import baseline_fit_predict
from mrsfm_model.evaluation.tasks import benchmark_from_config
from mrsfm_model.model.export import build_vit, load_encoder
from mrsfm_model.training.pretrain import run_pretrain

name, steps, *over = sys.argv[1:]
steps = int(steps)
run = Path("runs/experiments") / name
cfg = load_config([*over, f"train.steps={steps}", f"run_dir={run}", "device=cpu", "train.checkpoint_every=500", "train.log_every=50"])
t0 = time.time()
if steps > 0:
    run_pretrain(cfg, log=lambda m: None)
tp = time.time() - t0
bench = benchmark_from_config(cfg, seed=1)
enc = run / "encoder.safetensors"
@torch.no_grad()
def feats(vit):
    vit.eval()
    out = []
    for i in range(0, len(bench.x), 100):
        t = vit.forward_features(bench.x[i:i+100])
        out.append(torch.cat([t[:, 1:].flatten(1), t[:, 1:].mean(1)], 1))
    return torch.cat(out).numpy()
from mrsfm_model.model.mae import configured_mae

torch.manual_seed(0)
arms = {"pixels": bench.x.flatten(1).numpy()}
if steps > 0:
    arms["pretrained"] = feats(load_encoder(enc, global_pool="avg"))
torch.manual_seed(0)
from mrsfm_model.model.export import encoder_state
from mrsfm_model.model.mae import SpectroMAE

init = SpectroMAE(configured_mae(cfg.model, cfg.data))
vit = build_vit(init.cfg, global_pool="avg"); vit.load_state_dict(encoder_state(init), strict=False)
arms["random_init"] = feats(vit)
res = {"name": name, "steps": steps, "pretrain_s": round(tp, 1), "over": over}
if steps > 0:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    res["loss_first"], res["loss_last"] = rows[0]["loss"], rows[-1]["loss"]
y = bench.vendor.numpy(); te = bench.test.numpy()
for arm, f in arms.items():
    for n in (25, 50, 100):
        accs = []
        for s in range(5):
            idx = bench.labelled_sample(n, s).numpy()
            p = baseline_fit_predict(f[idx], y[idx], f[te], "classification", 3, 0.01)
            accs.append(float((p.argmax(1) == y[te]).mean()))
        res[f"{arm}_{n}"] = round(float(np.mean(accs)), 3)
print(json.dumps(res), flush=True)
with open("docs/experiments/screen.jsonl", "a") as fh:
    fh.write(json.dumps(res) + "\n")
