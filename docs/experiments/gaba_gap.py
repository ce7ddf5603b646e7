"""Why the head's GABA/tCr R² is 0.52 on validation and 0.38 on test: error and spread of the truth on each split.

    python docs/experiments/gaba_gap.py [ENCODER]   # default the shipped encoder; benchmark seeds 1 (validation) and 2 (test); JSON lines
"""
import json
import sys

import numpy as np
import torch

from mrsfm_model.config import load_config
from mrsfm_model.evaluation.finetune import head_estimates
from mrsfm_model.evaluation.stats import regression_metrics
from mrsfm_model.evaluation.tasks import benchmark_from_config
from mrsfm_model.model.export import shipped

enc = sys.argv[1] if len(sys.argv) > 1 else shipped()
cfg = load_config(["device=cpu"]); ft = cfg.finetune
for seed in (1, 2):
    bench = benchmark_from_config(cfg, seed)
    est = head_estimates(enc, bench.x, torch.device("cpu")).numpy(); y = bench.ratios.numpy(); t = bench.test.numpy()
    for j, name in enumerate(("GABA/tCr", "NAA/tCr")):
        e, yy = est[t, j], y[t, j]
        r2 = regression_metrics(yy[:, None], e[:, None], [name])[f"r2_{name}"]
        print(json.dumps({"encoder": str(enc), "benchmark_seed": seed, "target": name, "n": int(t.sum()), "r2": round(float(r2), 3),
                          "rmse": round(float(np.sqrt(((e - yy) ** 2).mean())), 4), "sd_truth": round(float(yy.std()), 4),
                          "bias": round(float((e - yy).mean()), 4), "corr": round(float(np.corrcoef(e, yy)[0, 1]), 3)}))
