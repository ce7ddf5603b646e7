"""Markdown tables of a finetune.json (as in README): python docs/experiments/readme_table.py runs/final_test/finetune.json"""
import json
import sys

res = json.load(open(sys.argv[1]))
HEAD = {"vendor": ("accuracy", "vendor, accuracy"), "quant": ("r2_GABA/tCr", "GABA/tCr, R²")}
NAMES = {("pretrained", "full"): "pretrained, full fine-tune", ("random_init", "full"): "random-init control, full fine-tune",
         ("scratch", "full"): "scratch (timm init), full fine-tune", ("pretrained", "linear"): "pretrained, linear probe",
         ("random_init", "linear"): "random-init control, linear probe", ("scratch", "linear"): "scratch, linear probe",
         ("baseline", "spectrum"): "baseline: logistic / ridge on spectra", ("baseline", "pixels"): "baseline: logistic / ridge on pixels",
         ("baseline", "lcm_fit"): "baseline: linear-combination fit (no labels)",
         ("pretrained", "head"): "pretrained, its own latent head (no labels)",
         ("pretrained", "head_cal"): "pretrained, latent head calibrated on the labels"}
sizes = sorted({r["n_labels"] for r in res["rows"]})
extra = [("quant", "r2_NAA/tCr", "NAA/tCr, R²")]
print("| task, metric | arm | " + " | ".join(f"{n} labels" for n in sizes) + " |")
print("| --- | --- | " + " | ".join("---" for _ in sizes) + " |")
for task, key, title in [(t, *HEAD[t]) for t in ("vendor", "quant")] + extra:
    first = True
    for arm, name in NAMES.items():
        rows = {r["n_labels"]: r for r in res["rows"] if r["task"] == task and (r["init"], r["mode"]) == arm}
        if not rows:
            continue
        cells = [f"{rows[n]['metrics'][key]['mean']:.2f} ± {rows[n]['metrics'][key]['ci95']:.2f}" if n in rows else "" for n in sizes]
        print(f"| {title if first else ''} | {name} | " + " | ".join(cells) + " |")
        first = False
print()
print("| task | paired difference (per seed) | " + " | ".join(f"{n} labels" for n in sizes) + " |")
print("| --- | --- | " + " | ".join("---" for _ in sizes) + " |")
pairs = {}
for p in res["paired"]:
    pairs.setdefault((p["task"], p["arm"], p["minus"]), {})[p["n_labels"]] = p
for (task, arm, minus), by_n in pairs.items():
    if arm not in ("pretrained full", "pretrained head", "pretrained head_cal") and not minus.startswith(("random_init", "scratch")):
        continue
    cells = [f"{by_n[n]['mean']:+.3f} ± {by_n[n]['ci95']:.3f}" if n in by_n else "" for n in sizes]
    print(f"| {task} | {arm} − {minus} | " + " | ".join(cells) + " |")
