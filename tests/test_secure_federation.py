"""Secure aggregation as it really runs: a SuperLink, one SuperNode (with its site worker) per site
and `flwr run` on loopback, micro MAE, fl.secure_aggregation=true.

  1. 3 sites, 2 rounds: both rounds complete through SecAgg+, the aggregate is checkpointed, and
     nothing the coordinator writes (metrics.jsonl, its log) holds a site's loss.
  2. the same run to round 3, one SuperNode killed once it has its round-3 training task (after
     sharing its keys): the round completes from the two others through SecAgg+'s recovery.
"""

from __future__ import annotations

import re
import signal
import threading

import pytest
from helpers import phase, text_of, wait_for

from server.example_sites import SITES, prepare_site_data
from server.local import LocalFederation
from server.rundir import RunDir

pytestmark = pytest.mark.slow  # real processes: a SuperLink, three SuperNodes and their workers

RUN = {"overrides": "model=micro data.batch_size=4 fl.secure_aggregation=true", "local-steps": 2,
       "sites": ",".join(SITES), "min-sites": 3, "wire-dtype": "fp32"}


def _count(path, needle: str) -> int:
    return path.read_text(errors="replace").count(needle) if path.exists() else 0


@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("secure_federation")
    run_dir = out / "run"
    rd, logs = RunDir(run_dir), out / "logs"
    phases: dict = {"out": out, "rd": rd}
    fed = LocalFederation(out, SITES, log=lambda m: None)
    try:
        fed.start_superlink(timeout_s=180)  # a loaded machine: more than the default 30 s
        fed.start_supernodes(prepare_site_data(out / "sites"))
        phases[1] = fed.run({**RUN, "num-rounds": 2, "run-dir": str(run_dir)}, timeout_s=400)
        # a secure round sends each site 4 train messages (setup, keys, training, unmask): the 11th
        # is its round-3 training task, so it dies having shared its keys, before its masked update
        victim = SITES[1]
        res: dict = {}
        runner = threading.Thread(target=lambda: res.update(fed.run(
            {**RUN, "num-rounds": 3, "run-dir": str(run_dir), "round-timeout-s": 20},
            timeout_s=300)))
        runner.start()
        wait_for(lambda: _count(logs / f"supernode_{victim}.log", "Receiving: train message") >= 11, 200,
                 f"round 3's training task at {victim}")
        fed.stop(f"supernode_{victim}", sig=signal.SIGKILL, grace_s=0)
        runner.join(300)
        phases[2] = res
        phases["victim"] = victim
    except Exception as exc:
        phases["error"] = f"{type(exc).__name__}: {exc} (logs in {logs})"
    finally:
        fed.close()
    transcript = logs / "flwr_run.log"
    phases["transcript"] = transcript.read_text(errors="replace") if transcript.exists() else ""
    return phases


def test_secure_rounds_complete_and_the_coordinator_writes_no_site_loss(secure_federation):
    res, rd = phase(secure_federation, 1), secure_federation["rd"]
    assert res["status"] == "finished:completed", res
    rows = rd.read_metrics()
    assert [r["round"] for r in rows[:2]] == [1, 2]
    for r in rows[:2]:
        assert rd.checkpoint(r["round"]).is_file()
        assert r["wire_dtype"] == "secagg" and r["loss"] > 0 and r["num_sites"] == 3
        assert r["secure_aggregation"]["shares"] == 3 and r["secure_aggregation"]["threshold"] == 2
        assert sorted(s["site"] for s in r["sites"]) == sorted(SITES)
        for s in r["sites"]:
            assert "loss" not in s and s["num_examples"] == 2 * 4 and s["bytes_up"] > 0
    # every site logged its own loss; none of those numbers reaches the coordinator's files
    written = rd.metrics.read_text() + secure_federation["transcript"]
    site_losses = [m for site in SITES for m in re.findall(r"round [12]: 2 steps in [\d.]+ s, loss (\d+\.\d{4})",
                                                          text_of(secure_federation["out"] / "logs" /
                                                                  f"supernode_{site}.log"))]
    assert len(site_losses) >= 6, site_losses
    for r in rows[:2]:  # the aggregate loss is the sites' mean (equal examples), as each site logged its own
        own = [float(m) for site in SITES for m in re.findall(
            rf"round {r['round']}: 2 steps in [\d.]+ s, loss (\d+\.\d{{4}})",
            text_of(secure_federation["out"] / "logs" / f"supernode_{site}.log"))]
        assert len(own) == 3 and r["loss"] == pytest.approx(sum(own) / 3, abs=2e-3), (r["loss"], own)
    assert not [x for x in site_losses if x in written], "a site's loss reached the coordinator"
    assert "secure aggregation (SecAgg+)" in secure_federation["transcript"]
    assert (rd.path / "encoder.safetensors").is_file()


def test_a_site_killed_mid_round_the_secure_round_completes_from_the_others(secure_federation):
    res, rd = phase(secure_federation, 2), secure_federation["rd"]
    rows = {r["round"]: r for r in rd.read_metrics()}
    assert 3 in rows, (res, secure_federation["transcript"][-3000:])
    victim = secure_federation["victim"]
    assert sorted(s["site"] for s in rows[3]["sites"]) == sorted(set(SITES) - {victim})
    assert [d["site"] for d in rows[3]["dropped"]] == [victim]
    assert rd.checkpoint(3).is_file()
