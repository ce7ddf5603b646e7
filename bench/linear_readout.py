"""Time the tuned linear read-out (`evaluation/linear.py`): the penalty chosen by inner CV over the
`finetune.l2` grid, then the fit, at the benchmark's shapes (25/50/100 labelled rows; the ViT's
pixels, 6 144 features, and a probe's band tokens, 64), for logistic (3 vendors) and ridge
regression. Prints one JSON line per shape: seconds, the chosen penalty. Synthetic rows with a
weak class signal, seeded, so two commits can be compared on the same problems."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from mrsfm_model.config import load_config
from mrsfm_model.evaluation.linear import fit_linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per shape (the median is reported)")
    args = ap.parse_args()
    grid = list(load_config().finetune.l2)
    rng = np.random.default_rng(0)
    total = 0.0
    for n in (25, 50, 100):
        for d in (6144, 64):
            y = np.arange(n) % 3
            f = rng.standard_normal((n, d)) + np.eye(3)[y] @ (0.1 * rng.standard_normal((3, d)))
            target = f[:, :5] @ rng.standard_normal(5) + rng.standard_normal(n)
            for task, labels, n_out in (("classification", y, 3), ("regression", target, 1)):
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    model = fit_linear(f, labels, task, n_out, grid)
                    times.append(time.perf_counter() - t)
                total += float(np.median(times))
                print(json.dumps({"rows": n, "features": d, "task": task, "seconds": round(float(np.median(times)), 4),
                                  "l2": model.l2}), flush=True)
    print(json.dumps({"total_seconds": round(total, 3), "grid": grid}), flush=True)


if __name__ == "__main__":
    main()
