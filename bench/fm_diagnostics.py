"""Does the pretrained model carry knowledge? Diagnostics of an encoder, as JSON lines.

- `weight_movement`: relative distance ||w - w0|| / ||w0|| of the encoder from its initialisation
  after pretraining (w0: the MAE built with the card's seed), and of a full fine-tune from the
  pretrained weights (100 labels, the configured recipe): pretraining that barely moves the
  weights, next to a fine-tune that moves them far more, is pretraining that cannot matter.
- `mae_vs_interpolation`: the MAE's masked-band loss on fresh simulated spectra against a trivial
  predictor that linearly interpolates every masked band from the nearest visible bands above and
  below (same masks, same loss); `ratio` < 1 means the model predicts more than interpolation.
- `probe`: logistic regression on the frozen encoder's band tokens (flat readout), on the
  VALIDATION benchmark (benchmark seed 1), for the pretrained encoder and for the same MAE encoder
  at initialisation (the random-encoder control), beside logistic regression on the image pixels.
- `oracle`: the same pixel regression on the noise-free versions of the same scans (snr = inf):
  the ceiling that removing noise alone would give a linear model.

Usage: python bench/fm_diagnostics.py [--encoder PATH] [--seeds 5] [overrides...]
(default encoder: the shipped one; its card's input settings are used).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from mrsfm_model.config import load_config
from mrsfm_model.data.stream import build_stream
from mrsfm_model.evaluation.finetune import FinetuneConfig, train_model
from mrsfm_model.evaluation.networks import random_init_encoder
from mrsfm_model.evaluation.study import baseline_fit_predict
from mrsfm_model.evaluation.tasks import benchmark_from_config
from mrsfm_model.model.export import encoder_state, load_encoder, read_encoder_config, shipped
from mrsfm_model.model.mae import SpectroMAE
from mrsfm_model.model.weights import read_tensors

VALIDATION_SEED = 1


def _rel(a: dict, b: dict) -> float:
    keys = [k for k in a if k in b and not k.startswith(("head.", "pos_embed"))]
    num = sum(float((a[k].float() - b[k].float()).square().sum()) for k in keys)
    den = sum(float(b[k].float().square().sum()) for k in keys)
    return math.sqrt(num / den)


def _interpolate(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked tokens (rows of the band grid) linearly interpolated from the nearest visible ones."""
    b, n, d = target.shape
    out = target.clone()
    for i in range(b):
        vis = (mask[i] == 0).nonzero()[:, 0].numpy()
        for j in (mask[i] == 1).nonzero()[:, 0].numpy():
            lo, hi = vis[vis < j], vis[vis > j]
            if len(lo) and len(hi):
                w = (j - lo[-1]) / (hi[0] - lo[-1])
                out[i, j] = (1 - w) * target[i, lo[-1]] + w * target[i, hi[0]]
            else:
                out[i, j] = target[i, lo[-1] if len(lo) else hi[0]]
    return out


def _probe(f: np.ndarray, bench, seeds: int, sizes=(25, 50, 100)) -> dict:
    y, te = bench.vendor.numpy(), bench.test.numpy()
    out = {}
    for n in sizes:
        acc = []
        for s in range(seeds):
            idx = bench.labelled_sample(n, s).numpy()
            p = baseline_fit_predict(f[idx], y[idx], f[te], "classification", 3, 0.01)
            acc.append(float((p.argmax(1) == y[te]).mean()))
        out[str(n)] = round(float(np.mean(acc)), 3)
    return out


@torch.no_grad()
def _tokens(vit, x: torch.Tensor) -> np.ndarray:
    vit.eval()
    return torch.cat([vit.forward_features(x[i:i + 100])[:, 1:].flatten(1) for i in range(0, len(x), 100)]).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--seeds", type=int, default=5)
    args, overrides = ap.parse_known_args()
    enc = args.encoder or shipped()
    card = json.loads(open(str(enc).replace(".safetensors", ".json")).read())
    mcfg = read_encoder_config(enc)
    cfg = load_config(["device=cpu", *overrides])
    torch.manual_seed(int(card.get("recipe", {}).get("seed", 0)))
    init = SpectroMAE(mcfg)
    pretrained = load_encoder(enc, global_pool="avg").state_dict()
    bench = benchmark_from_config(cfg, seed=VALIDATION_SEED)

    # 1. weight movement: pretraining vs a fine-tune of 100 labels
    ft = FinetuneConfig.from_config({**cfg.finetune, "mode": "full"})
    idx = bench.labelled_sample(100, 0)
    tuned = train_model(bench.x[idx], bench.vendor[idx], "classification", 3, enc, mcfg, ft, 0, torch.device("cpu"))
    print(json.dumps({"diagnostic": "weight_movement", "pretraining": round(_rel(pretrained, encoder_state(init)), 4),
                      "finetune_100_labels": round(_rel(tuned.state_dict(), pretrained), 4),
                      "finetune_lr": ft.blr * ft.batch_size / 256}), flush=True)

    # 2. masked-band loss against interpolation, on fresh simulated spectra
    mae = SpectroMAE(mcfg)
    # the whole MAE beside the encoder: NAME.mae.safetensors (shipped) or mae.safetensors (a run dir)
    found = [p for p in (Path(str(enc).replace(".safetensors", ".mae.safetensors")), Path(enc).parent / "mae.safetensors")
             if p.is_file()]
    if found:
        mae_path = found[0]
        mae.load_state_dict(read_tensors(mae_path))
        stream = build_stream(cfg.data, seed=123)
        x = stream.sim_batch(10**7, k=96).x
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            loss, pred, mask, _ = mae.eval()(x, generator=gen)
            target = mae.patchify(x)
            interp = _interpolate(target, mask)
            base = float((((interp - target) ** 2).mean(-1) * mask).sum() / mask.sum())
        print(json.dumps({"diagnostic": "mae_vs_interpolation", "mae_loss": round(float(loss), 4),
                          "interpolation_loss": round(base, 4), "ratio": round(float(loss) / base, 3)}), flush=True)

    # 3. frozen band-token probe: pretrained vs the same encoder at initialisation vs pixels
    torch.manual_seed(0)
    rnd = random_init_encoder(mcfg, 0, "flat")
    print(json.dumps({"diagnostic": "probe", "split": f"validation (benchmark seed {VALIDATION_SEED})",
                      "pretrained": _probe(_tokens(load_encoder(enc, global_pool="avg"), bench.x), bench, args.seeds),
                      "random_init": _probe(_tokens(rnd, bench.x), bench, args.seeds),
                      "pixels": _probe(bench.x.flatten(1).numpy(), bench, args.seeds)}), flush=True)

    # 4. oracle: the same scans without noise
    clean = benchmark_from_config(cfg, seed=VALIDATION_SEED, noise_free=True)
    print(json.dumps({"diagnostic": "oracle", "pixels_noise_free": _probe(clean.x.flatten(1).numpy(), bench, args.seeds)}),
          flush=True)


if __name__ == "__main__":
    main()
