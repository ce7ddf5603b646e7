"""How much of the GABA/tCr error is the noise? The shipped head and the linear-combination fit on the
benchmark's test subjects, on the scans as simulated and on the very same scans without noise (snr = inf).

    python docs/experiments/gaba_ceiling.py [SEED ...]   # benchmark seeds (default 1 = validation); JSON lines

A quantifier whose error stays when the noise is gone is limited by something else: what it cannot
tell apart in a noise-free spectrum (e.g. GABA under the co-edited macromolecules at 3 ppm, whose size
is drawn independently of GABA's).
"""
import json
import sys

import numpy as np
import torch

from mrsfm_model.config import load_config
from mrsfm_model.data.stream import InputBuilder
from mrsfm_model.evaluation.finetune import head_estimates
from mrsfm_model.evaluation.stats import regression_metrics
from mrsfm_model.evaluation.tasks import QUANT_TARGETS, benchmark_from_config, lcm_ratios
from mrsfm_model.model.export import shipped


def scores(est: np.ndarray, y: np.ndarray) -> dict:
    r2 = regression_metrics(y, est, QUANT_TARGETS)
    return {name: {"r2": round(r2[f"r2_{name}"], 3), "rmse": round(float(np.sqrt(((est[:, j] - y[:, j]) ** 2).mean())), 4)}
            for j, name in enumerate(QUANT_TARGETS)}


cfg = load_config(["device=cpu"]); ft = cfg.finetune; b = InputBuilder.from_data_config(cfg.data)
cpu = torch.device("cpu")
for seed in [int(s) for s in sys.argv[1:]] or [1]:
    for noise_free in (False, True):
        bench = benchmark_from_config(cfg, seed, cpu, noise_free=noise_free)
        t = bench.test; y = bench.ratios[t].numpy()
        head = head_estimates(shipped(), bench.x, cpu)[t].numpy()
        lcm = lcm_ratios(bench, t.nonzero()[:, 0], b.grid).numpy()
        for arm, est in (("head", head), ("lcm", lcm)):
            print(json.dumps({"benchmark_seed": seed, "noise_free": noise_free, "arm": arm, "n": int(t.sum()),
                              **scores(est, y)}), flush=True)
