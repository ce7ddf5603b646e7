"""Which of the shipped quantifier's outputs can be trusted? R² of every latent-head output against
the simulator's truth, on fresh simulated spectra (seeds above 2**40, never seen in pretraining)
taken through the same path as a file (`InputBuilder.prepare`), per MEGA-PRESS vendor profile.

    python docs/experiments/head_outputs.py [ENCODER] [N_PER_PROFILE]
"""
import json
import sys

import torch

from mrsfm_model.data.latents import NAMES, latent_targets
from mrsfm_model.data.simulate import Simulator
from mrsfm_model.data.stream import InputBuilder
from mrsfm_model.model.export import shipped
from mrsfm_model.model.quantifier import load_quantifier
from mrsfm_model.reports.cards import read_card

enc = sys.argv[1] if len(sys.argv) > 1 else shipped()
n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
card = read_card(enc)
builder = InputBuilder.from_dict({k: card[k] for k in ("grid", "spectrogram", "channels")})
q = load_quantifier(enc)
preds, truths = [], []
for profile in ("megapress_ge", "megapress_philips", "megapress_siemens"):
    sim = Simulator(profile, device="cpu")
    out = sim.simulate(n, seed=2**40 + 777)
    truths.append(latent_targets(out.truth, sim.mm_names))
    x = torch.stack([builder.prepare(s).image for s in out.to_spectra()])
    with torch.no_grad():
        preds.append(q(x))
p, t = torch.cat(preds), torch.cat(truths)
r2 = {}
for j, name in enumerate(NAMES):
    ok = torch.isfinite(t[:, j])
    y, f = t[ok, j], p[ok, j]
    r2[name] = round(float(1 - ((f - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()), 3)
print(json.dumps({"encoder": str(enc), "spectra": len(p), "r2_log_or_scaled": r2}))
