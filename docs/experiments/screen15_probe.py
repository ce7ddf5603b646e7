"""Screen 15: encoders compared on the VALIDATION vendor benchmark (seed 1) by their frozen read-outs,
paired by labelled sample: the linear probe on the band tokens and the latent read-out, each with
its penalty chosen by inner CV (finetune.l2), beside the pixel and spectrum baselines with the same
grid. Prints one JSON line per (read-out, labels) with each arm's mean and the paired differences
of every encoder against the first one and against the pixels.

    python docs/experiments/screen15_probe.py ENCODER [ENCODER ...]   # SEEDS=10 SIZES=25,50,100
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from mrsfm_model.config import load_config  # noqa: E402
from mrsfm_model.data.spectrum import VENDORS  # noqa: E402
from mrsfm_model.evaluation.linear import fit_predict  # noqa: E402
from mrsfm_model.evaluation.networks import frozen_network, network_outputs  # noqa: E402
from mrsfm_model.evaluation.stats import mean_ci95  # noqa: E402
from mrsfm_model.evaluation.tasks import benchmark_from_config  # noqa: E402
from mrsfm_model.model.export import read_encoder_config  # noqa: E402

encoders = [Path(p) for p in sys.argv[1:]]
sizes = [int(v) for v in os.environ.get("SIZES", "25,50,100").split(",")]
seeds = range(int(os.environ.get("SEEDS", "10")))
cfg = load_config(["device=cpu"])
grid = tuple(cfg.finetune.l2)
bench = benchmark_from_config(cfg, seed=1)  # validation
test, y = bench.test.numpy(), bench.vendor.numpy()
feats = {"pixels": bench.x.flatten(1).numpy(), "spectrum": bench.spectra.numpy()}
for enc in encoders:
    mcfg = read_encoder_config(enc)
    for readout in ("linear", "latent"):
        torch.manual_seed(0)
        net = frozen_network(enc, mcfg, readout, "flat", len(VENDORS))
        feats[f"{enc.stem}:{readout}"] = network_outputs(net, bench.x, torch.device("cpu")).numpy()
names = list(feats)
first = [n for n in names if ":" in n]
for n in sizes:
    acc = {k: [] for k in names}
    for s in seeds:
        idx = bench.labelled_sample(n, s).numpy()
        for k in names:
            prob = fit_predict(feats[k][idx], y[idx], feats[k][test], "classification", len(VENDORS), grid)
            acc[k].append(float((prob.argmax(1) == y[test]).mean()))
    row = {"n_labels": n, "seeds": len(seeds), "accuracy": {k: round(float(np.mean(v)), 3) for k, v in acc.items()}}
    diffs = {}
    for k in first:
        readout = k.split(":")[1]
        ref = f"{encoders[0].stem}:{readout}"
        if k != ref:
            diffs[f"{k} - {ref}"] = mean_ci95(np.subtract(acc[k], acc[ref]))
        diffs[f"{k} - pixels"] = mean_ci95(np.subtract(acc[k], acc["pixels"]))
    row["paired"] = {k: {"mean": round(v["mean"], 3), "ci95": round(v["ci95"], 3)} for k, v in diffs.items()}
    print(json.dumps(row), flush=True)
