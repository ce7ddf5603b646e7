"""The site worker in real processes (SuperLink, SuperNodes, launchers and workers on loopback).

One federation (module fixture), in phases:
  A. 3 sites with their workers (the default), 2 rounds.
  B. the same sites with site.worker=false (a fresh flwr-clientapp process per message), the same 2
     rounds into another run dir: the same global weights as A. The SuperNodes of A, stopped as
     systemd stops a unit (SIGTERM to the process group), left the SuperLink: no round of B or C
     waits for a node of the phase before.
  C. workers again, 3 rounds of a few seconds each; hcfmrp's worker is SIGKILLed during round 2: the
     round aggregates the other two, the launcher restarts the worker, round 3 has all three.
  D. a run whose app bundle carries changed client code: every site refuses it, nothing trains.
  E. a worker started by hand with a wrong secret, and a second one for a site's state folder: each
     exits with one line; then Ctrl-C (SIGINT) to the launcher: its SuperNode and worker are gone.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import pytest
import torch
from helpers import alive, children, phase, run_module, wait_for
from safetensors.torch import load_file

from server.bundle import stage_app
from server.example_sites import SITES, prepare_site_data
from server.local import LocalFederation
from server.rundir import RunDir

RUN = {"overrides": "model=micro data.batch_size=4", "local-steps": 3, "sites": ",".join(SITES), "min-sites": 2}


def _worker_pids(log) -> list[int]:
    return [int(p) for p in re.findall(r"site worker ready \(pid (\d+)\)", log.read_text(errors="replace"))]


@pytest.fixture(scope="module")
def warm_federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("warm")
    logs = out / "logs"
    res: dict = {"out": out}
    fed = LocalFederation(out, SITES, log=lambda m: None)
    try:
        with fed:
            fed.start_supernodes(prepare_site_data(out / "sites"), supervise=False)
            res["A"] = fed.run({**RUN, "num-rounds": 2, "run-dir": str(out / "A")}, timeout_s=180)
            fed.stop(*[f"supernode_{s}" for s in SITES], grace_s=10)
            for site in SITES:
                fed.start_supernode(site, worker=False)
            res["B"] = fed.run({**RUN, "num-rounds": 2, "run-dir": str(out / "B")}, timeout_s=240)
            fed.stop(*[f"supernode_{s}" for s in SITES], grace_s=10)
            for site in SITES:
                fed.start_supernode(site)

            log = logs / "supernode_hcfmrp.log"
            before = log.read_text(errors="replace").count("Receiving: train message")
            outcome: dict = {}
            runner = threading.Thread(target=lambda: outcome.update(fed.run(
                # min-sites 3: round 3 waits until the restarted site is back (round 2 aggregates the
                # two replies it gets); without it a fast round 3 could start before it re-registers
                {**RUN, "num-rounds": 3, "run-dir": str(out / "C"), "local-sleep-s": 4.0, "round-timeout-s": 20,
                 "min-sites": 3},
                timeout_s=180)))
            runner.start()
            wait_for(lambda: log.read_text(errors="replace").count("Receiving: train message") >= before + 2, 90,
                     "round 2 to reach hcfmrp")
            # the moment: the worker has begun its 4 s of local work (its log line), not a guessed delay
            wait_for(lambda: "[mrsfm] hcfmrp round 2: local sleep" in log.read_text(errors="replace"), 90,
                     "hcfmrp's worker to start round 2")
            res["killed"] = _worker_pids(log)[-1]
            os.kill(res["killed"], signal.SIGKILL)
            runner.join(200)
            res["C"] = outcome
            res["C_log"] = log.read_text(errors="replace")

            trained = lambda s: (logs / f"supernode_{s}.log").read_text(errors="replace").count(f"[mrsfm] {s} round")  # noqa: E731
            res["D_before"] = {s: trained(s) for s in SITES}
            app = stage_app(out / "changed")
            (app / "client" / "app.py").write_text((app / "client" / "app.py").read_text() + "\n# changed\n")
            res["D"] = fed.run({**RUN, "num-rounds": 1, "run-dir": str(out / "D"), "round-timeout-s": 20},
                               timeout_s=120, app=app)
            res["D_logs"] = {s: (logs / f"supernode_{s}.log").read_text(errors="replace") for s in SITES}
            res["D_after"] = {s: trained(s) for s in SITES}

            launcher = fed.procs["supernode_unicamp"].pid
            res["E_children"] = children(launcher)
            words = Path(f"/proc/{launcher}/cmdline").read_bytes().decode().split("\0")
            port = next(w.split("=", 1)[1] for w in words if w.startswith("site.runtime_port="))
            state = next(w.split("=", 1)[1] for w in words if w.startswith("site.state_dir="))
            (out / "wrong.secret").write_bytes(b"x" * 32)
            for name, secret, folder in (("wrong_secret", out / "wrong.secret", str(out / "elsewhere")),
                                         ("second", Path(state) / "worker.secret", state)):
                res[name] = run_module("client.worker", "--runtime-api-address", f"127.0.0.1:{port}",
                                       "--secret-file", str(secret), "--state-dir", folder, timeout_s=60)
            res["E_workers"] = _worker_pids(logs / "supernode_unicamp.log")
            os.kill(launcher, signal.SIGINT)
            fed.procs["supernode_unicamp"].wait(timeout=60)  # raises (phase E fails) if it does not stop
            res["E_code"] = fed.procs.pop("supernode_unicamp").returncode
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc} (logs in {logs})"
    res["all_workers"] = [p for s in SITES for p in _worker_pids(logs / f"supernode_{s}.log")]
    return res


def test_warm_workers_and_fresh_processes_give_the_same_global_weights(warm_federation):
    a, b = phase(warm_federation, "A"), phase(warm_federation, "B")
    assert a["status"] == b["status"] == "finished:completed", (a, b)
    out = warm_federation["out"]
    wa, wb = (load_file(str(RunDir(out / x).checkpoint(2))) for x in "AB")
    assert wa.keys() == wb.keys()
    for k in wa:  # FedAvg sums the replies in arrival order: equal up to float rounding
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    rows = {x: RunDir(out / x).read_metrics() for x in "AB"}
    # round 2: the warm workers rebuilt nothing (no clock compared: exactly no build), fresh processes did
    warm_build = [s["build_seconds"] for s in rows["A"][1]["sites"]]
    cold_build = [s["build_seconds"] for s in rows["B"][1]["sites"]]
    assert warm_build == [0.0] * 3 and all(b > 0 for b in cold_build), (warm_build, cold_build)


def test_stopped_sites_leave_the_superlink_and_no_round_waits_for_them(warm_federation):
    out = warm_federation["out"]
    rows = [r for x in "BC" if (out / x / "metrics.jsonl").exists() for r in RunDir(out / x).read_metrics()]
    assert len(rows) == 5, warm_federation.get("error")
    ghosts = [d for r in rows for d in r["dropped"] if d["site"].startswith("node ")]
    assert not ghosts, ghosts  # a node no site name was learnt for: a SuperNode of an earlier phase


def test_a_killed_worker_costs_its_site_one_round_and_is_restarted(warm_federation):
    res = phase(warm_federation, "C")
    assert res["status"] == "finished:completed", res
    rows = {r["round"]: r for r in RunDir(warm_federation["out"] / "C").read_metrics()}
    assert sorted(s["site"] for s in rows[2]["sites"]) == ["einstein", "unicamp"]
    assert [d["site"] for d in rows[2]["dropped"]] == ["hcfmrp"]
    assert sorted(s["site"] for s in rows[3]["sites"]) == sorted(SITES)  # the restarted worker takes part
    assert "site worker exited (code -9); restarting it with its SuperNode" in warm_federation["C_log"]
    assert not alive(warm_federation["killed"])


def test_a_bundle_with_changed_client_code_is_refused_by_every_site(warm_federation):
    res = phase(warm_federation, "D")
    assert res["status"] != "finished:completed" or not RunDir(warm_federation["out"] / "D").read_metrics()
    for site, log in warm_federation["D_logs"].items():
        assert "client/app.py differs from this site's installed copy" in log, site
    assert warm_federation["D_after"] == warm_federation["D_before"]  # no site trained a step for it
    assert not (warm_federation["out"] / "D" / "rounds").is_dir() or not any(
        (warm_federation["out"] / "D" / "rounds").iterdir())


def test_a_worker_with_a_wrong_secret_or_a_second_worker_exits_with_one_line(warm_federation):
    wrong, second = phase(warm_federation, "wrong_secret"), phase(warm_federation, "second")
    assert wrong.returncode == 3 and "refused this worker's secret (HTTP 401)" in wrong.stderr, wrong.stderr[-500:]
    assert second.returncode == 3 and "another site worker (pid" in second.stderr, second.stderr[-500:]
    assert warm_federation["E_code"] == 0  # the site's own worker kept serving until Ctrl-C


def test_ctrl_c_stops_the_launcher_with_its_supernode_and_worker(warm_federation):
    kids = phase(warm_federation, "E_children")
    assert len(kids) == 2, kids  # flower-supernode and the worker
    assert warm_federation["E_code"] == 0
    assert not [p for p in kids if alive(p)]


def test_no_worker_is_left_behind(warm_federation):
    pids = warm_federation["all_workers"]
    assert len(pids) >= 7, warm_federation.get("error")  # 3 sites in phases A and C, 1 restart; B has none
    wait_for(lambda: not [p for p in pids if alive(p)], 15, "every worker to exit")
