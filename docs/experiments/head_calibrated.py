"""The latent head on the TEST benchmark (seed 2) after a per-target line fitted on n labelled
spectra (`head_metrics`, as `mrsfm finetune` scores `pretrained head_cal`), 5 seeds: how many labels
repair a head whose pretraining never saw the data's generator (the transfer split)?

    python docs/experiments/head_calibrated.py ENCODER [ENCODER ...]   # JSON lines
"""
import json
import sys

import torch

from mrsfm_model.config import load_config
from mrsfm_model.evaluation.finetune import head_estimates, head_metrics
from mrsfm_model.evaluation.stats import mean_ci95
from mrsfm_model.evaluation.tasks import benchmark_from_config

cfg = load_config(["device=cpu"]); ft = cfg.finetune
bench = benchmark_from_config(cfg)
for enc in sys.argv[1:]:
    est = head_estimates(enc, bench.x, torch.device("cpu"))
    for n in (0, 25, 100):
        runs = [head_metrics(est, bench.ratios, bench.labelled_sample(n, s) if n else None, bench.test) for s in range(5)]
        print(json.dumps({"encoder": enc, "benchmark_seed": int(ft.benchmark.seed), "n_labels": n,
                          **{k: {m: round(v, 3) for m, v in mean_ci95([r[k] for r in runs]).items()}
                             for k in ("r2_GABA/tCr", "r2_NAA/tCr")}}), flush=True)
