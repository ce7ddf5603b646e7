"""Copy a pretraining run into the package as a shipped model, with its card completed.

    [NAME=mrsfm_tiny BF16=1] python docs/experiments/ship.py RUN_DIR "COMMAND" "MADE_BY" [VENDOR_JSON QUANT_JSON]
NAME: the shipped name (default: the default model's, mrsfm_micro); BF16=1 stores the weights in
bfloat16 (half the bytes; loading casts them back to the model's float32), which keeps a tiny
model's encoder + MAE within the package's 25 MB.
RUN_DIR holds encoder.safetensors, encoder.json and mae.safetensors from `mrsfm pretrain`;
VENDOR_JSON / QUANT_JSON are `mrsfm finetune`'s finetune.json of the test-split tables (their
per-arm means go into the card's "benchmark"). Without them the card says the figures are pending.
"""
import json
import os
import sys
from pathlib import Path

import torch

from mrsfm_model.model.export import SHIPPED_DIR, SHIPPED_NAME, export_encoder, init_mae
from mrsfm_model.model.mae import MAEConfig, SpectroMAE
from mrsfm_model.model.weights import read_metadata, read_tensors, write_tensors

run, command, made_by, *tables = sys.argv[1:]
run = Path(run)
card = json.loads((run / "encoder.json").read_text())
NAME = os.environ.get("NAME", SHIPPED_NAME)
card.update(name=NAME, command=command, made_by=made_by)


def means(path: str, metric: str) -> dict:
    rows = json.loads(Path(path).read_text())["rows"]
    out: dict = {}
    for r in rows:
        arm = f"{r['init']} {r['mode']}" if r["init"] != "baseline" else f"baseline {r['mode']}"
        if metric in r["metrics"]:
            out.setdefault(arm, {})[str(r["n_labels"])] = round(r["metrics"][metric]["mean"], 3)
    return out


if tables:
    vendor, quant = tables
    card["benchmark"] = {
        "split": "test subjects (benchmark seed 2), 5 paired seeds, 2-core CPU; see docs/results.md",
        "command": "mrsfm finetune --out runs/final_vendor finetune.tasks=[vendor] \"finetune.seeds=[0,1,2,3,4]\" "
                   "(and finetune.tasks=[quant]); an encoder's own rows beside unchanged controls: "
                   "docs/experiments/final_pretrained_only.py + merge_final.py",
        "tables": [vendor, quant],
        "vendor_accuracy": means(vendor, "accuracy"),
        "gaba_tcr_r2": means(quant, "r2_GABA/tCr"),
        "naa_tcr_r2": means(quant, "r2_NAA/tCr"),
    }
else:
    card["benchmark"] = "pending: measured on the test split after shipping (docs/results.md)"
# the encoder is exported afresh from the run's whole MAE, so that it carries the latent head (the
# model's own quantifier) even when the run was made before encoders did
mae = SpectroMAE(MAEConfig.from_dict(card["config"]))
init_mae(mae, run / "mae.safetensors")


def store(src: Path, dst: Path) -> None:
    """Copy a safetensors file, its floats in bfloat16 when BF16=1, its metadata unchanged."""
    meta, state = read_metadata(src), read_tensors(src)
    if os.environ.get("BF16") == "1":
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    write_tensors(state, dst, meta)


if os.environ.get("BF16") == "1":
    card["stored_as"] = "bfloat16 weights (loaded into float32)"
tmp = run / "ship_encoder.safetensors"
export_encoder(mae, tmp, card)
store(tmp, SHIPPED_DIR / f"{NAME}.safetensors")
(SHIPPED_DIR / f"{NAME}.json").write_text(tmp.with_suffix(".json").read_text())
store(run / "mae.safetensors", SHIPPED_DIR / f"{NAME}.mae.safetensors")
print(json.dumps({"shipped": str(SHIPPED_DIR / NAME), "benchmark": bool(tables),
                  "bytes": sum((SHIPPED_DIR / f).stat().st_size for f in (f"{NAME}.safetensors", f"{NAME}.mae.safetensors"))}))
