"""Copy a pretraining run into the package as the shipped model, with its card completed.

    python docs/experiments/ship.py RUN_DIR "COMMAND" "MADE_BY" [VENDOR_JSON QUANT_JSON]
RUN_DIR holds encoder.safetensors, encoder.json and mae.safetensors from `mrsfm pretrain`;
VENDOR_JSON / QUANT_JSON are `mrsfm finetune`'s finetune.json of the test-split tables (their
per-arm means go into the card's "benchmark"). Without them the card says the figures are pending.
"""
import json
import shutil
import sys
from pathlib import Path

from mrsfm_model.model.export import SHIPPED_DIR, SHIPPED_NAME, export_encoder, init_mae
from mrsfm_model.model.mae import MAEConfig, SpectroMAE

run, command, made_by, *tables = sys.argv[1:]
run = Path(run)
card = json.loads((run / "encoder.json").read_text())
card.update(name=SHIPPED_NAME, command=command, made_by=made_by)


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
        "split": "test subjects (benchmark seed 2), 5 paired seeds, 2-core CPU; see README 'Current results'",
        "command": "mrsfm finetune --out runs/final_vendor finetune.tasks=[vendor] \"finetune.seeds=[0,1,2,3,4]\" "
                   "(and finetune.tasks=[quant]); an encoder's own rows beside unchanged controls: "
                   "docs/experiments/final_pretrained_only.py + merge_final.py",
        "tables": [vendor, quant],
        "vendor_accuracy": means(vendor, "accuracy"),
        "gaba_tcr_r2": means(quant, "r2_GABA/tCr"),
        "naa_tcr_r2": means(quant, "r2_NAA/tCr"),
    }
else:
    card["benchmark"] = "pending: measured on the test split after shipping (README 'Current results')"
# the encoder is exported afresh from the run's whole MAE, so that it carries the latent head (the
# model's own quantifier) even when the run was made before encoders did
mae = SpectroMAE(MAEConfig.from_dict(card["config"]))
init_mae(mae, run / "mae.safetensors")
export_encoder(mae, SHIPPED_DIR / f"{SHIPPED_NAME}.safetensors", card)
shutil.copyfile(run / "mae.safetensors", SHIPPED_DIR / f"{SHIPPED_NAME}.mae.safetensors")
print(json.dumps({"shipped": str(SHIPPED_DIR), "benchmark": bool(tables)}))
