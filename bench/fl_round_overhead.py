"""What a federated round costs beyond local training: transport, (de)serialisation, processes.

A real loopback federation (SuperLink + one SuperNode per site, server/local.py) runs the
ViT-B-sized MAE (model=base, ~112M parameters) with local training replaced by a fixed sleep
(run config `local-sleep-s`: each site still decodes the global weights, loads them into its
model and encodes its reply, as in a real round). The same federation runs fp32 and then bf16
on the wire, so the two are measured side by side on the same processes and machine.

Prints JSON lines: one per round ({"wire_dtype", "round", "round_s", "overhead_s" = round_s -
sleep, "bytes_up_per_site", "bytes_down_per_site", "site_setup_s"}), one summary per wire dtype
(mean overhead over rounds, bytes per site per round), and one comparison line.
Usage: python bench/fl_round_overhead.py [--rounds 2] [--sleep 5] [--model base] [--sites 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from server.example_sites import SITES
from server.local import LocalFederation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sleep", type=float, default=5.0, help="seconds each site sleeps instead of training")
    ap.add_argument("--model", default="base")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fl_round_overhead_"))
    sites = [SITES[i % len(SITES)] for i in range(args.sites)]
    if len(set(sites)) != len(sites):
        raise SystemExit(f"at most {len(SITES)} sites (one per configs/site/*.yaml): {SITES}")
    summary = {}
    with LocalFederation(out, sites, log=lambda m: None) as fed:
        fed.start_supernodes()  # simulation only: the sleep replaces training anyway
        for dtype in args.dtypes.split(","):
            run_dir = out / f"run_{dtype}"
            res = fed.run({"overrides": f"model={args.model}", "num-rounds": args.rounds, "local-steps": 1,
                           "run-dir": str(run_dir), "min-sites": len(sites), "wire-dtype": dtype,
                           "local-sleep-s": args.sleep, "sites": ",".join(sites), "round-timeout-s": 900},
                          timeout_s=1800)
            if res["status"] != "finished:completed":
                raise SystemExit(f"{dtype} run ended {res['status']}; see {out / 'logs'}")
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            for r in rows:
                line = {"wire_dtype": dtype, "round": r["round"], "round_s": r["round_seconds"],
                        "overhead_s": round(r["round_seconds"] - args.sleep, 2),
                        "bytes_up_per_site": {s["site"]: s["bytes_up"] for s in r["sites"]},
                        "bytes_down_per_site": {s["site"]: s["bytes_down"] for s in r["sites"]},
                        "site_setup_s": {s["site"]: s["setup_seconds"] for s in r["sites"]}}
                print(json.dumps(line), flush=True)
            summary[dtype] = {
                "wire_dtype": dtype, "model": args.model, "sites": len(sites), "rounds": len(rows),
                "sleep_s": args.sleep,
                "mean_overhead_s": round(statistics.mean(r["round_seconds"] - args.sleep for r in rows), 2),
                "mean_bytes_up_per_site": int(statistics.mean(s["bytes_up"] for r in rows for s in r["sites"])),
                "mean_bytes_down_per_site": int(statistics.mean(s["bytes_down"] for r in rows for s in r["sites"])),
                "run_s": res["seconds"]}
            print(json.dumps({"summary": summary[dtype]}), flush=True)
    if {"fp32", "bf16"} <= set(summary):
        a, b = summary["fp32"], summary["bf16"]
        print(json.dumps({"compare": "bf16 vs fp32", "overhead_s": [a["mean_overhead_s"], b["mean_overhead_s"]],
                          "overhead_ratio": round(b["mean_overhead_s"] / a["mean_overhead_s"], 3),
                          "bytes_ratio": round(b["mean_bytes_up_per_site"] / a["mean_bytes_up_per_site"], 3)}))


if __name__ == "__main__":
    main()
