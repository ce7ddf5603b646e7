"""Load: many SuperNodes, each with its site worker, on one machine (loopback, micro model, CPU).

Each extra site is a copy of configs/site/<template>.yaml under a new name in a config folder of
its own (MRSFM_CONFIG_DIR), so every SuperNode is started by `python -m client --site NAME`
exactly as a hospital's. After the run, peak resident memory (VmHWM) of the SuperLink, of one
SuperNode and of one site worker are read from /proc, and the sum over every process.

Prints JSON lines: one per round ({"round", "round_s", "sites"}) and one summary ({"sites",
"rounds", "rounds_per_s", "run_s", "peak_rss_mb": {"superlink", "supernode", "worker",
"all_processes"}}).
Usage: python bench/fl_load.py [--sites 20] [--rounds 3] [--local-steps 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from server.example_sites import copy_site_configs
from server.local import LocalFederation


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def make_sites(n: int, template: str, folder: Path) -> list[str]:
    """A config folder (a copy of configs/) with n site files site00..; returns their names."""
    names = [f"site{i:02d}" for i in range(n)]
    copy_site_configs(folder, names, template)
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--template", default="unicamp")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="fl_load_"))).resolve()
    sites = make_sites(args.sites, args.template, out / "configs")
    env = {"MRSFM_CONFIG_DIR": str(out / "configs")}
    os.environ.update(env)  # the ServerApp too (it names the expected sites)
    with LocalFederation(out, sites, log=lambda m: None, threads_per_site=1) as fed:
        t0 = time.monotonic()
        for site in sites:
            fed.start_supernode(site, env=env)
        run_dir = out / "run"
        res = fed.run({"overrides": "model=micro data.batch_size=4", "num-rounds": args.rounds,
                       "local-steps": args.local_steps, "run-dir": str(run_dir), "min-sites": len(sites),
                       "sites": ",".join(sites), "round-timeout-s": 600, "wait-timeout-s": 600}, timeout_s=3000)
        if res["status"] != "finished:completed":
            raise SystemExit(f"run ended {res['status']}; see {fed.logs}")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            line = {"round": r["round"], "round_s": r["round_seconds"], "sites": len(r["sites"])}
            print(json.dumps(line), flush=True)
        link = _tree(fed.procs["superlink"].pid)
        site0 = _tree(fed.procs[f"supernode_{sites[0]}"].pid)
        node = next(p for p in site0 if "client.supernode" in _cmdline(p))  # Flower's SuperNode, as the launcher runs it
        worker = next(p for p in site0 if "client.worker" in _cmdline(p))
        everything = link + [p for s in sites for p in _tree(fed.procs[f"supernode_{s}"].pid)]
        peak = {"superlink": max(_peak_mb(p) for p in link), "supernode": _peak_mb(node), "worker": _peak_mb(worker),
                "all_processes": round(sum(_peak_mb(p) for p in everything), 1)}
        print(json.dumps({"summary": {"sites": len(sites), "rounds": len(rows), "run_s": res["seconds"],
                                      "start_to_end_s": round(time.monotonic() - t0, 1),
                                      "rounds_per_s": round(len(rows) / sum(r["round_seconds"] for r in rows), 4),
                                      "mean_round_s": round(sum(r["round_seconds"] for r in rows) / len(rows), 2),
                                      "peak_rss_mb": peak}}), flush=True)


if __name__ == "__main__":
    main()
