"""Screen 9: does the latent head quantify without labels? On the VALIDATION benchmark (seed 1; BENCH_SEED=2: test):
exp(head's log GABA/tCr and log tNAA/tCr) scored as predictions of the benchmark's GABA/tCr and
NAA/tCr with no labels (`zero_shot`), and after a 1-feature linear calibration on n labels
(`calibrated`, 5 paired seeds), beside the 23-feature ridge on the head and on the tokens.

    python docs/experiments/screen_zeroshot.py RUN_DIR [RUN_DIR ...]
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from omegaconf import OmegaConf  # noqa: E402

from mrsfm_model.config import load_config  # noqa: E402
from mrsfm_model.data.latents import NAMES  # noqa: E402
from mrsfm_model.evaluation.panel import Panel  # noqa: E402
from mrsfm_model.evaluation.stats import regression_metrics  # noqa: E402
from mrsfm_model.model.export import init_mae  # noqa: E402
from mrsfm_model.model.mae import SpectroMAE, configured_mae  # noqa: E402

cfg = load_config([f"finetune.benchmark.seed={os.environ.get('BENCH_SEED', '1')}", "finetune.seeds=[0,1,2,3,4]", "device=cpu"])
panel = Panel(cfg, torch.device("cpu"), tasks=("quant",))
task = panel.tasks[0]
bench, y = task.bench, task.y.numpy()
COLS = {"GABA/tCr": NAMES.index("GABA"), "NAA/tCr": NAMES.index("tNAA")}


@torch.no_grad()
def head_outputs(run: Path) -> np.ndarray:
    model = SpectroMAE(configured_mae(OmegaConf.to_container(OmegaConf.load(run / "config.yaml").model,
                                                             resolve=True), cfg.data))
    init_mae(model, run / "mae.safetensors")
    model.eval()
    out = [model.latent_head(model.encode(bench.x[i:i + 200])[:, 1:].flatten(1)) for i in range(0, len(bench.x), 200)]
    return torch.cat(out).numpy()


for run in map(Path, sys.argv[1:]):
    est = np.exp(head_outputs(run)[:, list(COLS.values())])
    test = bench.test.numpy()
    zero = regression_metrics(y[test], est[test], list(COLS))
    print(json.dumps({"run": run.name, "zero_shot": {k: round(v, 3) for k, v in zero.items() if k.startswith("r2")}}))
    for n in cfg.finetune.label_sizes:
        r2 = {k: [] for k in COLS}
        for s in cfg.finetune.seeds:
            idx = bench.labelled_sample(int(n), int(s)).numpy()
            for j, name in enumerate(COLS):
                a, b = np.polyfit(est[idx, j], y[idx, j], 1)
                r2[name].append(regression_metrics(y[test, j:j + 1], (a * est[test, j] + b)[:, None], [name])[f"r2_{name}"])
        print(json.dumps({"run": run.name, "n_labels": int(n),
                          "calibrated": {k: round(float(np.mean(v)), 3) for k, v in r2.items()}}), flush=True)
