"""The pretrained arm alone on the TEST benchmark (seed 2), 5 paired seeds, for an encoder whose
controls (random-init twin, scratch, baselines) are already in a finetune.json of the same
architecture and seeds: they do not depend on the encoder's weights, so only its own rows are run.

    python docs/experiments/final_pretrained_only.py ENCODER MODE SIZES OUT.json   # e.g. ... full 25,50,100 x.json
"""
import json
import sys

import torch

from mrsfm_model.config import load_config
from mrsfm_model.data.spectrum import VENDORS
from mrsfm_model.evaluation.finetune import FinetuneConfig, fit_and_evaluate
from mrsfm_model.evaluation.tasks import benchmark_from_config
from mrsfm_model.model.export import read_encoder_config

enc, mode, sizes, out = sys.argv[1], sys.argv[2], [int(n) for n in sys.argv[3].split(",")], sys.argv[4]
cfg = load_config(["device=cpu", "finetune.seeds=[0,1,2,3,4]"])
ft = cfg.finetune
bench = benchmark_from_config(cfg)
fcfg = FinetuneConfig.from_config(ft, mode=mode, steps=ft.steps)
rows = []
for n in sizes:
    per_seed = []
    for s in ft.seeds:
        idx = bench.labelled_sample(n, int(s))
        per_seed.append(fit_and_evaluate(bench.x[idx], bench.vendor[idx], bench.x[bench.test], bench.vendor[bench.test],
                                         "classification", enc, read_encoder_config(enc), fcfg, int(s),
                                         torch.device("cpu"), n_classes=len(VENDORS)))
    rows.append({"task": "vendor", "init": "pretrained", "mode": mode, "n_labels": n, "per_seed": per_seed})
    print(json.dumps({"n_labels": n, "accuracy": [round(r["accuracy"], 3) for r in per_seed]}), flush=True)
json.dump({"encoder": enc, "benchmark_seed": int(ft.benchmark.seed), "rows": rows}, open(out, "w"), indent=1)
