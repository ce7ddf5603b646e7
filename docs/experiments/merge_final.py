"""Merge final_pretrained_only.py's rows of a new encoder into a finetune.json whose control and
baseline rows were run with the same architecture, benchmark and seeds (they do not depend on the
encoder's weights), recompute the paired differences, and write a finetune.json of the new encoder.

    python docs/experiments/merge_final.py OLD_finetune.json OUT.json NEW_ROWS.json [NEW_ROWS.json ...]
"""
import json
import sys

from mrsfm_model.evaluation.finetune import paired_differences
from mrsfm_model.evaluation.stats import mean_ci95

old, out, *news = sys.argv[1:]
res = json.load(open(old))
fresh = [r for path in news for r in json.load(open(path))["rows"]]
for r in fresh:
    r["metrics"] = {k: mean_ci95([s[k] for s in r["per_seed"]]) for k in r["per_seed"][0]}
keys = {(r["task"], r["init"], r["mode"], r["n_labels"]) for r in fresh}
rows = [r for r in res["rows"] if (r["task"], r["init"], r["mode"], r["n_labels"]) not in keys] + fresh
assert all(r["init"] != "pretrained" or (r["task"], r["init"], r["mode"], r["n_labels"]) in keys for r in rows), \
    "an old pretrained row would be kept"
res.update(rows=rows, paired=paired_differences(rows), encoder=json.load(open(news[0]))["encoder"],
           controls_from=old)
json.dump(res, open(out, "w"), indent=1)
print(f"{len(fresh)} new rows, {len(rows) - len(fresh)} kept -> {out}")
