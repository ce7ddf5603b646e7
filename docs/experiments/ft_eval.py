"""Fine-tune on the VALIDATION benchmark (seed 1): the encoder, its random-init twin and timm scratch.
Usage: [ARMS=pretrained,random_init,scratch SIZES=25,100 SEEDS=3] python docs/experiments/ft_eval.py ENCODER TAG [overrides]"""
import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from mrsfm_model.config import load_config
from mrsfm_model.evaluation.finetune import FinetuneConfig, fit_and_evaluate
from mrsfm_model.evaluation.networks import RANDOM_INIT
from mrsfm_model.evaluation.tasks import benchmark_from_config
from mrsfm_model.model.export import read_encoder_config

name, tag = sys.argv[1], sys.argv[2]; enc = Path(name if name.endswith(".safetensors") else f"runs/experiments/{name}/encoder.safetensors"); over = sys.argv[3:]
sizes = [int(v) for v in os.environ.get("SIZES", "25,100").split(",")]
seeds = int(os.environ.get("SEEDS", "2"))
arms = os.environ.get("ARMS", "pretrained,random_init").split(",")
mcfg = read_encoder_config(enc)
cfg = load_config(["device=cpu", *over])
bench = benchmark_from_config(cfg, seed=1)
fcfg = FinetuneConfig.from_config(cfg.finetune)
res = {"name": name, "tag": tag, "over": over}
te = bench.test
for arm in arms:
    e = {"pretrained": enc, "random_init": RANDOM_INIT, "scratch": None}[arm]
    for n in sizes:
        acc = []
        t0 = time.time()
        for s in range(seeds):
            idx = bench.labelled_sample(n, s)
            m = fit_and_evaluate(bench.x[idx], bench.vendor[idx], bench.x[te], bench.vendor[te], "classification", e, mcfg, fcfg, s, torch.device("cpu"), n_classes=3)
            acc.append(round(m["accuracy"], 3))
        res[f"{arm}_{n}"] = acc
        res["sec_per_run"] = round((time.time() - t0) / seeds, 1)
        print(json.dumps(res), flush=True)
with open("docs/experiments/finetune.jsonl", "a") as fh:
    fh.write(json.dumps(res) + "\n")
