"""What a federated round costs beyond local training: transport, (de)serialisation, processes.

A real loopback federation (SuperLink + one SuperNode per site, server/local.py) runs the
ViT-B-sized MAE (model=base, ~112M parameters) with local training replaced by a fixed sleep
(run config `local-sleep-s`: each site still decodes the global weights, loads them into its
model and encodes its reply, as in a real round). The same federation runs fp32 and then bf16
on the wire, so the two are measured side by side on the same processes and machine. Each site
mode runs in a federation of its own: `warm` (the site worker keeps the model between rounds,
the default) and `ephemeral` (site.worker=false: Flower's fresh ClientApp process per message).

Prints JSON lines: one per round ({"mode", "wire_dtype", "round", "round_s", "overhead_s" =
round_s - sleep, "bytes_up_per_site", "bytes_down_per_site", "site_setup_s", "server_s": the
ServerApp's send / wait / check seconds from metrics.jsonl}), one summary per
mode and wire dtype (mean overhead over rounds after the first, which builds the model in either
mode; bytes per site per round), and comparison lines (bf16 vs fp32; ephemeral vs warm; with
`--polls 3,0.5`, the SuperNode's idle wait `site.poll_s`: Flower's fixed 3 s against the sites'
default, each in a federation of its own, mode names e.g. `warm@poll3`).
Usage: python bench/fl_round_overhead.py [--rounds 3] [--sleep 5] [--model base] [--sites 3]
       [--dtypes fp32,bf16] [--modes warm,ephemeral] [--polls S,S] [--database] [--out DIR]
`--sleep 0` trains for real (`--local-steps` steps) instead of sleeping.
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
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=5.0, help="seconds each site sleeps instead of training")
    ap.add_argument("--model", default="base")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="warm,ephemeral")
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--polls", default="", help="site.poll_s values, each its own federation (default: the sites' own)")
    ap.add_argument("--database", action="store_true", help="the SuperLink keeps its state in SQLite (a file "
                    "under OUT), as a lab that must survive restarts does; default: in memory")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="fl_round_overhead_"))).resolve()
    sites = [SITES[i % len(SITES)] for i in range(args.sites)]
    if len(set(sites)) != len(sites):
        raise SystemExit(f"at most {len(SITES)} sites (one per configs/site/*.yaml): {SITES}")
    summary = {}
    polls = [float(x) for x in args.polls.split(",") if x.strip()]
    modes = [f"{m}@poll{p:g}" for m in args.modes.split(",") for p in polls] if polls else args.modes.split(",")
    for mode in modes:
        kind, _, poll = mode.partition("@poll")
        db = out / mode / "superlink.db" if args.database else None
        with LocalFederation(out / mode, sites, log=lambda m: None, database=db) as fed:
            for site in sites:  # simulation only: the sleep replaces training anyway
                fed.start_supernode(site, worker=kind == "warm", **({"poll_s": poll} if poll else {}))
            for dtype in args.dtypes.split(","):
                summary[mode, dtype] = measure(fed, out / mode / f"run_{dtype}", mode, dtype, sites, args)
    for dtype in args.dtypes.split(","):
        for kind in args.modes.split(","):
            if len(polls) > 1 and all((f"{kind}@poll{p:g}", dtype) in summary for p in polls):
                slow, fast = (summary[f"{kind}@poll{p:g}", dtype] for p in (max(polls), min(polls)))
                print(json.dumps({"compare": f"poll {max(polls):g} s vs {min(polls):g} s ({kind}, {dtype})",
                                  "round_s": [slow["mean_round_s"], fast["mean_round_s"]],
                                  "round_ratio": round(slow["mean_round_s"] / fast["mean_round_s"], 2)}))
    for mode in modes:
        if (mode, "fp32") in summary and (mode, "bf16") in summary:
            a, b = summary[mode, "fp32"], summary[mode, "bf16"]
            print(json.dumps({"compare": f"bf16 vs fp32 ({mode})", "overhead_s": [a["mean_overhead_s"], b["mean_overhead_s"]],
                              "overhead_ratio": round(b["mean_overhead_s"] / a["mean_overhead_s"], 3),
                              "bytes_ratio": round(b["mean_bytes_up_per_site"] / a["mean_bytes_up_per_site"], 3)}))
    for dtype in args.dtypes.split(","):
        if ("warm", dtype) in summary and ("ephemeral", dtype) in summary:
            w, e = summary["warm", dtype], summary["ephemeral", dtype]
            print(json.dumps({"compare": f"ephemeral vs warm ({dtype})",
                              "overhead_s": [e["mean_overhead_s"], w["mean_overhead_s"]],
                              "round_s": [e["mean_round_s"], w["mean_round_s"]],
                              "overhead_ratio": round(e["mean_overhead_s"] / max(w["mean_overhead_s"], 1e-3), 2)}))


def measure(fed: LocalFederation, run_dir: Path, mode: str, dtype: str, sites: list[str], args,
            overrides: str = "", tag: dict | None = None) -> dict:
    """One run of `args.rounds` rounds on `fed`: a JSON line per round and a summary line (returned).
    `overrides`: more Hydra overrides after model=; `tag`: fields put first in every line (other
    benches reuse this, e.g. bench/fl_secagg.py)."""
    tag = dict(tag or {})
    res = fed.run({"overrides": f"model={args.model} {overrides}".strip(), "num-rounds": args.rounds,
                   "local-steps": args.local_steps,
                   "run-dir": str(run_dir), "min-sites": len(sites), "wire-dtype": dtype,
                   "local-sleep-s": args.sleep, "sites": ",".join(sites), "round-timeout-s": 900}, timeout_s=1800)
    if res["status"] != "finished:completed":
        raise SystemExit(f"{mode} {dtype} run ended {res['status']}; see {fed.logs}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        line = {**tag, "mode": mode, "wire_dtype": r.get("wire_dtype", dtype), "round": r["round"], "round_s": r["round_seconds"],
                "overhead_s": round(r["round_seconds"] - args.sleep, 2),
                "bytes_up_per_site": {s["site"]: s["bytes_up"] for s in r["sites"]},
                "bytes_down_per_site": {s["site"]: s["bytes_down"] for s in r["sites"]},
                "site_setup_s": {s["site"]: s["setup_seconds"] for s in r["sites"]},
                "server_s": r.get("server_seconds", {})}
        print(json.dumps(line), flush=True)
    later = rows[1:] or rows  # round 1 builds the model in both modes
    summary = {
        **tag, "mode": mode, "wire_dtype": rows[0].get("wire_dtype", dtype), "model": args.model, "sites": len(sites), "rounds": len(rows),
        "sleep_s": args.sleep, "mean_round_s": round(statistics.mean(r["round_seconds"] for r in later), 2),
        "mean_overhead_s": round(statistics.mean(r["round_seconds"] - args.sleep for r in later), 2),
        "first_round_s": rows[0]["round_seconds"],
        "mean_bytes_up_per_site": int(statistics.mean(s["bytes_up"] for r in rows for s in r["sites"])),
        "mean_bytes_down_per_site": int(statistics.mean(s["bytes_down"] for r in rows for s in r["sites"])),
        "run_s": res["seconds"]}
    print(json.dumps({"summary": summary}), flush=True)
    return summary


if __name__ == "__main__":
    main()
