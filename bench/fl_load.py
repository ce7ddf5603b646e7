"""Load: many SuperNodes, each with its site worker, on one machine (loopback, micro model, CPU).

Each extra site is a copy of configs/site/<template>.yaml under a new name in a config folder of
its own (MRSFM_CONFIG_DIR), so every SuperNode is started by `python -m client --site NAME`
exactly as a hospital's. Twice a second during the run, every process of the federation is read
from /proc (peak resident memory, VmHWM), so that a process that ends before the run does (the
ServerApp, each round's ClientApp) is counted too. Reported per role: the SuperLink itself, the
ServerApp it starts (it holds torch and the global model), one SuperNode, one site worker (it
serves the site's ClientApp messages), and the sum of the peaks of every process seen.

Prints JSON lines: one per round ({"round", "round_s", "sites"}) and one summary ({"sites",
"rounds", "rounds_per_s", "run_s", "peak_rss_mb": {"superlink", "serverapp", "supernode",
"worker", "all_processes"}}).
Usage: python bench/fl_load.py [--sites 20] [--rounds 3] [--local-steps 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from server.example_sites import copy_site_configs
from server.local import LocalFederation


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _parents() -> dict[int, int]:
    """pid -> parent pid, for every process (one pass over /proc)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parent


def _tree(pid: int, parent: dict[int, int]) -> list[int]:
    """`pid` and all its descendants, from a `_parents()` map."""
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


ROLES = {"superlink": "flower-superlink", "serverapp": "flwr-serverapp", "supernode": "client.supernode",
         "worker": "client.worker"}


class PeakSampler(threading.Thread):
    """Peak RSS of every process under the named root processes, sampled until stopped."""

    def __init__(self, roots: dict[str, int], every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.roots, self.every_s = roots, every_s
        self.peaks: dict[int, float] = {}
        self.cmd: dict[int, str] = {}
        self.owner: dict[int, str] = {}  # pid -> the root it was found under
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.every_s)

    def sample(self) -> None:
        parent = _parents()  # one pass over /proc per sample, not one per root
        for name, root in self.roots.items():
            for pid in _tree(root, parent):
                try:
                    peak = _peak_mb(pid)
                except OSError:
                    continue  # ended between the listing and the read
                self.peaks[pid] = max(peak, self.peaks.get(pid, 0.0))
                # the latest command line: a process first seen between fork and exec shows its parent's
                self.cmd[pid] = _cmdline(pid) or self.cmd.get(pid, "")
                self.owner.setdefault(pid, name)

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.sample()

    def role_peak(self, role: str, root: str | None = None) -> float:
        """The largest peak among processes of `role` (under the root named `root` only, if given)."""
        return max((mb for pid, mb in self.peaks.items() if ROLES[role] in self.cmd[pid]
                    and root in (None, self.owner[pid])), default=0.0)


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
        sampler = PeakSampler({name: proc.pid for name, proc in fed.procs.items()})
        sampler.start()
        res = fed.run({"overrides": "model=micro data.batch_size=4", "num-rounds": args.rounds,
                       "local-steps": args.local_steps, "run-dir": str(run_dir), "min-sites": len(sites),
                       "sites": ",".join(sites), "round-timeout-s": 600, "wait-timeout-s": 600}, timeout_s=3000)
        sampler.stop()
        if res["status"] != "finished:completed":
            raise SystemExit(f"run ended {res['status']}; see {fed.logs}")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            line = {"round": r["round"], "round_s": r["round_seconds"], "sites": len(r["sites"])}
            print(json.dumps(line), flush=True)
        site0 = f"supernode_{sites[0]}"  # one site's processes: its SuperNode, worker and ClientApps
        peak = {role: sampler.role_peak(role, site0 if role in ("supernode", "worker") else None) for role in ROLES}
        peak["all_processes"] = round(sum(sampler.peaks.values()), 1)
        print(json.dumps({"summary": {"sites": len(sites), "rounds": len(rows), "run_s": res["seconds"],
                                      "start_to_end_s": round(time.monotonic() - t0, 1),
                                      "rounds_per_s": round(len(rows) / sum(r["round_seconds"] for r in rows), 4),
                                      "mean_round_s": round(sum(r["round_seconds"] for r in rows) / len(rows), 2),
                                      "peak_rss_mb": peak}}), flush=True)


if __name__ == "__main__":
    main()
