"""Between-study variation: the held-out check's two PRESS tasks on fresh simulated studies.

The intervals of a study run are over CV seeds on *one* study; the held-out vendor task reversed
the validation study's pretrained − random-init sign. This re-simulates the PRESS study with other
seeds (never used for a choice) and prints one JSON line per (study seed, target, arm): the mean
over CV seeds and the paired differences, so the spread across studies can be read off.

    python docs/experiments/study_replicates.py runs/study "2,3,4,5" "[0,1,2]" >> docs/experiments/study_replicates.jsonl
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from mrsfm_model.config import load_config
from mrsfm_model.evaluation.study import HEADLINE_METRIC, run_study
from mrsfm_model.logs import get_logger
from mrsfm_model.model.export import shipped

PROFILES = "press_ge,press_philips,press_siemens"


def main() -> None:
    root, study_seeds, cv_seeds = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    quiet = get_logger("evaluation").warning
    for s in study_seeds:
        data = root / f"replicate_press_{s}"
        if not (data / "labels.csv").exists():
            subprocess.run([sys.executable, "-m", "mrsfm_model.cli", "simulate", "--study", "--n", "60", "--profile",
                            PROFILES, "--seed", s, "--out", str(data)], check=True, capture_output=True)
        for target in ("vendor", "condition"):
            cfg = load_config(["study.mode=auto", f"study.seeds={cv_seeds}"])
            r = run_study(cfg, shipped(), data, data / "labels.csv", target, root / f"out_replicate_{s}_{target}",
                          "cpu", log=quiet)
            key = HEADLINE_METRIC[r["task"]]
            per = {a: np.array([x[key] for x in v["per_seed"]]) for a, v in r["arms"].items()}
            for arm in per:
                print(json.dumps({"study_seed": int(s), "target": target, "arm": arm, "metric": key,
                                  "mean": float(per[arm].mean()),
                                  "minus_baseline": float((per[arm] - per["baseline"]).mean()),
                                  "minus_random_init": float((per[arm] - per["random_init"]).mean())}), flush=True)


if __name__ == "__main__":
    main()
