"""Screen 12: which read-out should `mrsfm finetune --data --labels` use by default?

Runs the study command (every arm, grouped 5-fold CV, 5 seeds) on the simulated *validation*
studies of `mrsfm simulate --study` (seed 0; the held-out studies use seed 1), for several targets and study modes, and prints one
JSON line per (study, target, mode, arm): mean and 95 % interval over seeds, the paired difference
to the non-deep baseline and to the random-init twin, and which read-out mode auto chose per fold.

    mrsfm simulate --study --n 60 --profile press_ge,press_philips,press_siemens --out runs/study/press
    mrsfm simulate --study --n 60 --profile megapress_ge,megapress_philips,megapress_siemens --out runs/study/mega
    python docs/experiments/screen_study.py runs/study >> docs/experiments/screen_study.jsonl

The held-out check of the chosen default (`study.mode=auto` only, 10 seeds), once, after the choice:

    mrsfm simulate --study --n 60 --profile press_ge,press_philips,press_siemens --seed 1 --out runs/study/test_press
    mrsfm simulate --study --n 60 --profile megapress_ge,megapress_philips,megapress_siemens --seed 1 --out runs/study/test_mega
    python docs/experiments/screen_study.py runs/study test "[0,1,2,3,4,5,6,7,8,9]" >> docs/experiments/test_study.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from mrsfm_model.config import load_config
from mrsfm_model.evaluation.stats import mean_ci95
from mrsfm_model.evaluation.study import HEADLINE_METRIC, run_study
from mrsfm_model.logs import get_logger
from mrsfm_model.model.export import shipped

GRID = [  # (study, target, modes)
    ("press", "condition", ("auto", "latent", "linear", "full")),
    ("press", "vendor", ("auto", "latent", "linear", "full")),
    ("mega", "condition", ("auto", "latent", "linear", "full")),
    ("press", "NAA/tCr", ("auto", "latent", "linear")),
    ("press", "mI/tCr", ("auto", "latent", "linear")),
    ("mega", "GABA/tCr", ("auto", "latent", "linear")),
]
TEST_GRID = [(f"test_{study}", target, ("auto",)) for study, target, _ in GRID]


def main() -> None:
    root = Path(sys.argv[1])
    grid = TEST_GRID if len(sys.argv) > 2 and sys.argv[2] == "test" else GRID
    seeds = sys.argv[3] if len(sys.argv) > 3 else "[0,1,2,3,4]"
    quiet = get_logger("evaluation").warning
    for study, target, modes in grid:
        for mode in modes:
            cfg = load_config([f"study.mode={mode}", f"study.seeds={seeds}"])
            out = root / f"screen_{study}_{target.replace('/', '_')}_{mode}"
            r = run_study(cfg, shipped(), root / study, root / study / "labels.csv", target, out, "cpu", log=quiet)
            key = HEADLINE_METRIC[r["task"]]
            per = {a: np.array([s[key] for s in v["per_seed"]]) for a, v in r["arms"].items()}
            for arm, v in r["arms"].items():
                line = {"screen": 12 if grid is GRID else "test", "study": study, "target": target, "mode": mode, "arm": arm, "metric": key,
                        **mean_ci95(per[arm].tolist()), "per_seed": per[arm].round(4).tolist()}
                if arm != "baseline":
                    line["minus_baseline"] = mean_ci95((per[arm] - per["baseline"]).tolist())
                    line["chosen"] = dict(Counter(f["mode"] for f in v["per_fold"]))
                if arm == "pretrained":
                    line["minus_random_init"] = mean_ci95((per[arm] - per["random_init"]).tolist())
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
