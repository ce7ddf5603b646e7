"""What secure aggregation costs: round time and bytes per site, plain FedAvg against SecAgg+.

A real loopback federation (SuperLink + one SuperNode with its warm site worker per site,
server/local.py) per model size; on it, runs of plain FedAvg (`--dtype` on the wire) and of the
same run with `fl.secure_aggregation=true` alternate, `--repeats` times each in the order plain,
secure, secure, plain, ... so that a machine shared with other work slows both arms alike. Local
training is replaced by a fixed sleep (`--sleep`; each site still loads the global weights and
returns its weights, so its update is zero: SecAgg+'s work does not depend on the values);
`--sleep 0` trains for real (`--local-steps`). Sites beyond configs/site/ are copies of
`--template`'s site file (bench/fl_load.py's `make_sites`).

Prints JSON lines: bench/fl_round_overhead.py's line per round and summary per run (with "arm":
plain | secure, "repeat", and "wire_dtype" from metrics.jsonl: "secagg" for the secure arm;
bytes are what the ServerApp counts: packed weights in plain mode, every protocol message's
arrays, bytes and numbers in secure mode), then per model one {"compare": "secure vs plain"}
line: the arms' mean round time over rounds 2.. and all repeats, bytes up and down per site per
round, and the ratios secure / plain.
Usage: python bench/fl_secagg.py [--models micro,base] [--sites 4] [--rounds 2] [--repeats 2]
       [--sleep 2] [--dtype bf16] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from fl_load import make_sites
from fl_round_overhead import measure

from server.local import LocalFederation

ARMS = {"plain": "", "secure": "fl.secure_aggregation=true"}


def arm_order(repeats: int) -> list[tuple[int, str]]:
    """(repeat, arm) in the order plain, secure, secure, plain, ...: drift on a shared machine
    lands on both arms alike."""
    order = []
    for i in range(repeats):
        arms = ["plain", "secure"] if i % 2 == 0 else ["secure", "plain"]
        order += [(i, arm) for arm in arms]
    return order


def compare(model: str, runs: dict[str, list[dict]]) -> dict:
    """The secure arm against the plain one, over every repeat's summary."""
    mean = {arm: {k: statistics.mean(s[k] for s in runs[arm])
                  for k in ("mean_round_s", "mean_overhead_s", "mean_bytes_up_per_site", "mean_bytes_down_per_site")}
            for arm in ARMS}
    p, s = mean["plain"], mean["secure"]
    return {"compare": f"secure vs plain ({model})", "model": model, "repeats": len(runs["plain"]),
            "round_s": [round(p["mean_round_s"], 2), round(s["mean_round_s"], 2)],
            "overhead_s": [round(p["mean_overhead_s"], 2), round(s["mean_overhead_s"], 2)],
            "bytes_up_per_site": [int(p["mean_bytes_up_per_site"]), int(s["mean_bytes_up_per_site"])],
            "bytes_down_per_site": [int(p["mean_bytes_down_per_site"]), int(s["mean_bytes_down_per_site"])],
            "round_ratio": round(s["mean_round_s"] / p["mean_round_s"], 2),
            "overhead_ratio": round(s["mean_overhead_s"] / max(p["mean_overhead_s"], 1e-3), 2),
            "bytes_up_ratio": round(s["mean_bytes_up_per_site"] / p["mean_bytes_up_per_site"], 2),
            "bytes_down_ratio": round(s["mean_bytes_down_per_site"] / p["mean_bytes_down_per_site"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="micro,base")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sleep", type=float, default=2.0, help="seconds each site sleeps instead of training")
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", help="the plain arm's wire dtype")
    ap.add_argument("--template", default="unicamp")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="fl_secagg_"))).resolve()
    sites = make_sites(args.sites, args.template, out / "configs")
    env = {"MRSFM_CONFIG_DIR": str(out / "configs")}
    os.environ.update(env)  # the ServerApp too (it names the expected sites)
    for model in args.models.split(","):
        args.model = model
        runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        with LocalFederation(out / model, sites, log=lambda m: None) as fed:
            for site in sites:  # simulation only: the sleep replaces training anyway
                fed.start_supernode(site, env=env)
            for i, arm in arm_order(args.repeats):
                runs[arm].append(measure(fed, out / model / f"run_{arm}_{i}", "warm", args.dtype, sites, args,
                                         overrides=ARMS[arm], tag={"arm": arm, "repeat": i}))
        print(json.dumps(compare(model, runs)), flush=True)


if __name__ == "__main__":
    main()
