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

Screen 16 (which shipped encoder should the study mode use?): `ENCODER=<shipped name or file>` scores
that encoder instead of the default, `MODES=auto` keeps only the listed study modes (comma-separated):

    ENCODER=mrsfm_tiny MODES=auto python docs/experiments/screen_study.py runs/study >> docs/experiments/screen16_study_encoder.jsonl
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from mrsfm_model.config import load_config
from mrsfm_model.evaluation.stats import mean_ci95
from mrsfm_model.evaluation.study import HEADLINE_METRIC, run_study
from mrsfm_model.logs import get_logger
from mrsfm_model.model.export import resolve_encoder, shipped

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
    encoder = resolve_encoder(os.environ["ENCODER"]) if "ENCODER" in os.environ else shipped()
    keep = os.environ.get("MODES", "").split(",") if os.environ.get("MODES") else None
    for study, target, modes in grid:
        for mode in (m for m in modes if keep is None or m in keep):
            cfg = load_config([f"study.mode={mode}", f"study.seeds={seeds}"])
            out = root / f"screen_{study}_{target.replace('/', '_')}_{mode}_{encoder.stem}"
            r = run_study(cfg, encoder, root / study, root / study / "labels.csv", target, out, "cpu", log=quiet)
            key = HEADLINE_METRIC[r["task"]]
            per = {a: np.array([s[key] for s in v["per_seed"]]) for a, v in r["arms"].items()}
            for arm, v in r["arms"].items():
                line = {"screen": 12 if grid is GRID else "test", "encoder": encoder.stem, "study": study, "target": target, "mode": mode, "arm": arm, "metric": key,
                        **mean_ci95(per[arm].tolist()), "per_seed": per[arm].round(4).tolist()}
                if arm != "baseline":
                    line["minus_baseline"] = mean_ci95((per[arm] - per["baseline"]).tolist())
                if arm not in ("baseline", "fit"):
                    line["chosen"] = dict(Counter(f["mode"] for f in v["per_fold"]))
                if arm == "pretrained":
                    line["minus_random_init"] = mean_ci95((per[arm] - per["random_init"]).tolist())
                    if "fit" in per:  # what MRS users run today: fit, then regress on the fitted ratios
                        line["minus_fit"] = mean_ci95((per[arm] - per["fit"]).tolist())
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
