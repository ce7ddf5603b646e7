"""Screen: is a denoiser learnable, and do its outputs carry the noise-free oracle's headroom?

For a pretrained MAE (RUN/mae.safetensors) on the VALIDATION benchmark (seed 1): the MSE of its
reconstruction with nothing masked against the noise-free image of the same scans (vs the noisy
input's own MSE), and the few-label vendor probe (logistic regression, 5 seeds) on the encoder's
flat tokens, on the reconstruction, on the noisy pixels and on the noise-free pixels (oracle).
`python docs/experiments/screen_dae.py runs/experiments/NAME`
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from mrsfm_model.evaluation.study import baseline_fit_predict  # noqa: E402
from mrsfm_model.evaluation.tasks import benchmark_from_config  # noqa: E402
from mrsfm_model.model.mae import MAEConfig, SpectroMAE  # noqa: E402
from mrsfm_model.model.weights import load_weights, read_metadata  # noqa: E402

run = Path(sys.argv[1])
cfg = OmegaConf.load(run / "config.yaml")
bench = benchmark_from_config(cfg, seed=1)
clean = benchmark_from_config(cfg, seed=1, noise_free=True)
mae = SpectroMAE(MAEConfig.from_dict(json.loads(read_metadata(run / "mae.safetensors")["mae_config"])))
load_weights(mae, run / "mae.safetensors")
mae.eval()
toks, recs = [], []
with torch.no_grad():
    for i in range(0, len(bench.x), 100):
        x = bench.x[i:i + 100]
        latent, mask, ids = mae.forward_encoder(x, 0.0)
        pred = mae.forward_decoder(latent, ids)
        t = torch.gather(latent[:, 1:], 1, ids.unsqueeze(-1).expand(-1, -1, latent.shape[2]))  # grid order
        toks.append(torch.cat([t.flatten(1), t.mean(1)], 1))
        recs.append(mae.unpatchify(pred))
tok, rec = torch.cat(toks), torch.cat(recs)
mse = lambda a, c: float(((a - c) ** 2).mean())  # noqa: E731
res = {"run": str(run), "mse_noisy_vs_clean": round(mse(bench.x, clean.x), 5),
       "mse_recon_vs_clean": round(mse(rec, clean.x), 5)}
arms = {"tokens": tok.numpy(), "recon": rec.flatten(1).numpy(), "pixels": bench.x.flatten(1).numpy(),
        "oracle": clean.x.flatten(1).numpy()}
y, te = bench.vendor.numpy(), bench.test.numpy()
for arm, f in arms.items():
    for n in (25, 50, 100):
        accs = []
        for s in range(5):
            idx = bench.labelled_sample(n, s).numpy()
            p = baseline_fit_predict(f[idx], y[idx], f[te], "classification", 3, 0.01)
            accs.append(float((p.argmax(1) == y[te]).mean()))
        res[f"{arm}_{n}"] = round(float(np.mean(accs)), 3)
print(json.dumps(res), flush=True)
with open("docs/experiments/screen_dae.jsonl", "a") as fh:
    fh.write(json.dumps(res) + "\n")
