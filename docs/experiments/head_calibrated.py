"""The latent head on the TEST benchmark (seed 2) after a per-target line fitted on n labelled
spectra (`head_metrics`, as `mrsfm finetune` scores `pretrained head_cal`), 5 seeds: how many labels
repair a head whose pretraining never saw the data's generator (the transfer split)?

    python docs/experiments/head_calibrated.py ENCODER [ENCODER ...]   # JSON lines
"""
import json
import sys

import torch

from mrsfm_model.config import load_config
from mrsfm_model.data.stream import InputBuilder
from mrsfm_model.evaluation.finetune import head_estimates, head_metrics
from mrsfm_model.evaluation.stats import mean_ci95
from mrsfm_model.evaluation.tasks import build_benchmark

cfg = load_config(["device=cpu"]); ft = cfg.finetune; b = InputBuilder.from_data_config(cfg.data)
bench = build_benchmark(b.grid, b.transform, b.channels, ft.benchmark.subjects_per_vendor, ft.benchmark.scans_per_subject,
                        ft.benchmark.test_fraction, ft.benchmark.seed, torch.device("cpu"))
for enc in sys.argv[1:]:
    est = head_estimates(enc, bench.x, torch.device("cpu"))
    for n in (0, 25, 100):
        runs = [head_metrics(est, bench.ratios, bench.labelled_sample(n, s) if n else None, bench.test) for s in range(5)]
        print(json.dumps({"encoder": enc, "benchmark_seed": int(ft.benchmark.seed), "n_labels": n,
                          **{k: {m: round(v, 3) for m, v in mean_ci95([r[k] for r in runs]).items()}
                             for k in ("r2_GABA/tCr", "r2_NAA/tCr")}}), flush=True)
