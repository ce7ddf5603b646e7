"""The transfer split's target on the TEST vendor benchmark: the transfer encoder's own rows minus
the in-distribution encoder's, paired by seed (same labelled samples, same fine-tune seeds).

    python docs/experiments/transfer_paired.py IN_DIST_finetune.json TRANSFER_ROWS.json [TRANSFER_ROWS.json ...]
"""
import json
import sys

from mrsfm_model.evaluation.stats import mean_ci95

base, *news = sys.argv[1:]
ref = {(r["mode"], r["n_labels"]): r for r in json.load(open(base))["rows"] if r["init"] == "pretrained"}
for path in news:
    for r in json.load(open(path))["rows"]:
        old = ref[(r["mode"], r["n_labels"])]
        a = [s["accuracy"] for s in r["per_seed"]]
        b = [s["accuracy"] for s in old["per_seed"]]
        d = mean_ci95([x - y for x, y in zip(a, b, strict=True)])
        print(json.dumps({"task": r["task"], "mode": r["mode"], "n_labels": r["n_labels"],
                          "transfer": round(sum(a) / len(a), 3), "in_distribution": round(sum(b) / len(b), 3),
                          "transfer_minus_in_distribution": {k: round(v, 3) for k, v in d.items()}}))
