"""One DP site's local round, timed: where a DP round's time goes besides the steps themselves.

Micro model on the CPU, 80 local steps of which 20 are DP-SGD steps on 48 private spectra
(expected private batch 16, q = 1/3), sigma chosen for epsilon 8 over 160 private steps, 100
private steps already in the site's ledger: a round of `mrsfm compare`'s dp_eps8 arm. Prints one
JSON line: `round_s`, `accountant_calls` (PRV epsilon evaluations during the round: each costs
0.1-0.4 s on a CPU, more at small noise), `private_steps`, `epsilon`, `sigma`.
Usage: python bench/dp_round.py [--epsilon 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from opacus.accountants import prv

from mrsfm_model.config import load_config
from mrsfm_model.data.stream import build_stream
from mrsfm_model.model.mae import build_mae, mae_loss
from mrsfm_model.training.privacy import DPConfig, PrivateSite
from mrsfm_model.training.trainer import OptimConfig, Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    calls = [0]
    evaluate = prv.PRVAccountant.get_epsilon

    def counted(self, *a, **k):
        calls[0] += 1
        return evaluate(self, *a, **k)

    prv.PRVAccountant.get_epsilon = counted
    cfg = load_config(["model=micro", "data.batch_size=32"])
    torch.manual_seed(0)
    stream = build_stream(cfg.data, seed=0)
    trainer = Trainer(build_mae(cfg.model, cfg.data), mae_loss, OptimConfig.from_config(cfg.train), 640, 32,
                      torch.device("cpu"), progress=False)
    dp = DPConfig.from_config(cfg.privacy, enabled=True, target_epsilon=args.epsilon, epsilon_budget=args.epsilon,
                              planned_steps=160)
    site = PrivateSite(trainer, stream.sim_batch(0, k=48).x, dp)
    site.engine.accountant.history = [(site.noise_multiplier, site.sample_rate, 100)]
    public = (stream.sim_batch(i, k=32) for i in range(1, 10**6))
    calls[0] = 0
    t0 = time.perf_counter()
    out = site.run_round(public, 80, 20)
    print(json.dumps({"round_s": round(time.perf_counter() - t0, 2), "accountant_calls": calls[0],
                      "private_steps": out["private_steps"], "epsilon": round(out["epsilon"], 3),
                      "sigma": round(site.noise_multiplier, 3)}))
    site.close()


if __name__ == "__main__":
    main()
