"""Federated pretraining as it really runs: a SuperLink, one SuperNode per site and `flwr run`,
as separate processes on loopback (CPU, micro MAE), plus the wire format and the site launcher.

One federation (module fixture) goes through four phases, each checked by its own test:
  1. 3 sites, 2 rounds: every round's checkpoint and metrics line, with 3 sites' metrics.
  2. the same run dir to 4 rounds: resumes at round 3; one SuperNode is killed during round 3
     (the round aggregates the other two); the SuperLink is killed during round 4.
  3. SuperLink restarted (and the SuperNodes it forgot), a run that needs all 3 sites: fails
     after wait-timeout-s naming the missing site (never a silent hang).
  4. a run that needs 2 sites: resumes after round 3 and completes round 4.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from helpers import REPO, ScriptedGrid, live_members, phase, run_module, text_of, wait_for

from mrsfm_model.model.wire import (
    LAYOUT,
    PACKED,
    as_fp32_record,
    decode,
    encode,
    nbytes,
    pack,
    pack_state,
    to_state,
    unpack,
    unpack_state,
)
from server.example_sites import SITES, prepare_site_data
from server.local import LocalFederation
from server.rundir import RunDir
from server.strategy import make_strategy
from server.transport import WireGrid

RUN = {"overrides": "model=micro data.batch_size=4", "local-steps": 3, "sites": ",".join(SITES)}
ROUND_TIMEOUT_S = 30  # the round deadline (run config round-timeout-s) of the phase in which a site crashes


# -- weights on the wire (unit) -----------------------------------------------------------------------
def test_bf16_wire_round_trips_within_bf16_precision_and_halves_the_bytes():
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 33, generator=gen) * 3, "b": torch.randn(7, generator=gen) * 1e-3,
             "n": torch.tensor([3, 4], dtype=torch.int64)}
    rec16, rec32 = encode(state, "bf16"), encode(state, "fp32")
    assert rec16["w"].dtype == "int16" and rec16["n"].dtype == "int64"  # only floats travel as 16 bits
    back = decode(rec16, state)
    for k in ("w", "b"):
        assert back[k].dtype == torch.float32
        torch.testing.assert_close(back[k], state[k], rtol=2**-8, atol=0)  # bf16: 8 significant bits
        assert torch.equal(back[k], state[k].to(torch.bfloat16).float())  # exactly bf16 rounding, no more
    assert torch.equal(back["n"], state["n"])
    assert torch.equal(decode(rec32, state)["w"], state["w"])
    assert nbytes(rec16) < 0.55 * nbytes(rec32)
    with pytest.raises(ValueError, match="shape"):
        decode(rec16, {**state, "w": torch.zeros(3)})


def test_a_packed_record_unpacks_to_the_same_bytes_in_two_arrays():
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 33, generator=gen), "b": torch.randn(7, generator=gen),
             "n": torch.tensor([3, 4], dtype=torch.int64), "e": torch.zeros(0)}
    for wire_dtype in ("bf16", "fp32"):
        rec = encode(state, wire_dtype)
        packed = pack(rec)
        assert list(packed.keys()) == [PACKED, LAYOUT]
        back = unpack(packed)
        assert list(back.keys()) == list(rec.keys())
        assert all(back[k].dtype == rec[k].dtype and back[k].shape == rec[k].shape and back[k].data == rec[k].data
                   for k in rec)
    assert unpack(rec) is rec  # a record that was never packed passes as it is
    from flwr.app import Array
    longer = pack(rec)
    longer[PACKED] = Array(np.concatenate([longer[PACKED].numpy(), np.zeros(3, np.uint8)]))
    with pytest.raises(ValueError, match="3 bytes beyond its layout"):
        unpack(longer)


def test_the_direct_pack_and_unpack_match_the_two_step_ones():
    """What the sites and the server use (fewer copies) is byte-identical to encode+pack and decode+unpack."""
    gen = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(64, 33, generator=gen), "b": torch.randn(7, generator=gen),
             "n": torch.tensor([3, 4], dtype=torch.int64), "e": torch.zeros(0)}
    for wire_dtype in ("bf16", "fp32"):
        direct, two_step = pack_state(state, wire_dtype), pack(encode(state, wire_dtype))
        assert all(direct[k].data == two_step[k].data for k in (PACKED, LAYOUT))
        back, ref = unpack_state(direct, state), decode(unpack(two_step), state)
        assert list(back) == list(ref) and all(back[k].dtype == ref[k].dtype and torch.equal(back[k], ref[k])
                                               for k in ref)
    assert torch.equal(unpack_state(encode(state, "bf16"), state)["w"], decode(encode(state, "bf16"), state)["w"])
    with pytest.raises(ValueError, match="missing"):
        unpack_state(direct, {**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        unpack_state(direct, {**state, "w": torch.zeros(3)})
    with pytest.raises(ValueError, match="wire-dtype"):
        pack_state(state, "fp8")


FL = {"fedavg": None, "fedadam": type("Fl", (), {"eta": 1e-3, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-6})}


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_server_averages_decoded_float32_not_16_bit_views(monkeypatch, name):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    gen = torch.Generator().manual_seed(1)
    template = {"w": torch.zeros(500)}
    sites = {11: ("unicamp", torch.randn(500, generator=gen), 30), 12: ("hcfmrp", -torch.rand(500, generator=gen), 10)}

    class FakeGrid(ScriptedGrid):  # plays SuperLink + two SuperNodes that reply with bf16 weights
        def get_node_ids(self):
            return list(sites)

        def reply(self, messages):
            replies = []
            for m in messages:
                assert set(m.content["arrays"].keys()) == {PACKED, LAYOUT}  # one trip through Flower's store
                assert unpack(m.content["arrays"])["w"].dtype == "int16"  # the server sends 16 bits too
                name, w, n = sites[m.metadata.dst_node_id]
                replies.append(Message(RecordDict({"arrays": pack_state({"w": w}, "bf16"),  # as a real site
                                                   "metrics": MetricRecord({"num-examples": n, "loss": 1.0}),
                                                   "site": ConfigRecord({"site": name})}), reply_to=m))
            return replies

    grid = WireGrid(FakeGrid(), template, "bf16", min_sites=2, wait_timeout_s=1, examples_per_update=40)
    strategy = make_strategy(name, FL[name], min_sites=2)
    replies = grid.send_and_receive(strategy.configure_train(1, as_fp32_record(template), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, replies)
    got = to_state(arrays)["w"]
    assert got.dtype == torch.float32  # FedAdam's numpy math is float64: cast back, never 16 bits
    w16 = {k: v[1].to(torch.bfloat16).double() for k, v in sites.items()}
    mean = (w16[11] + w16[12]) / 2  # the server weighs by what it asked for, not the sites' 30 and 10
    if name == "fedavg":
        torch.testing.assert_close(got.double(), mean, rtol=1e-6, atol=1e-7)
    else:  # one Adam step of size ~eta from 0 along the sign of the averaged update
        assert torch.equal(torch.sign(got), torch.sign(mean).float()) and got.abs().max() < 2e-3
    assert sorted(r.site for r in grid.last_train) == ["hcfmrp", "unicamp"]
    assert all(r.bytes_up == r.bytes_down == nbytes(pack_state(template, "bf16")) for r in grid.last_train)  # as sent


def test_fedadam_moments_survive_a_restart(tmp_path):
    a = make_strategy("fedadam", FL["fedadam"], 2)
    a.m_t, a.v_t = {"w": torch.randn(4, 3).numpy()}, {"w": torch.rand(4, 3).numpy()}
    a.save_state(tmp_path / "s.safetensors")
    b = make_strategy("fedadam", FL["fedadam"], 2)
    b.load_state(tmp_path / "s.safetensors")
    assert (b.m_t["w"] == a.m_t["w"]).all() and (b.v_t["w"] == a.v_t["w"]).all()


@pytest.mark.parametrize("key", ["../../escape", "/abs", "a/b", ""])
def test_a_site_refuses_a_run_key_that_is_not_a_plain_name(key, tmp_path):
    from client.app import local_round

    conf = {"strategy": "fedavg", "server-round": 1, "local-steps": 1, "total-steps": 1, "wire-dtype": "bf16",
            "run-key": key, "overrides": "model=micro"}
    node = {"site": "unicamp", "state-dir": str(tmp_path / "state"), "device": "cpu", "overrides": ""}
    with pytest.raises(ValueError, match="unicamp: refused the server's run-key"):
        local_round(conf, node, lambda template: template)
    assert not any(tmp_path.iterdir())  # nothing written anywhere


def test_run_dir_resume_point_drops_uncommitted_metrics(tmp_path):
    rd = RunDir(tmp_path)
    rd.rounds.mkdir()
    for r in (1, 2):
        rd.checkpoint(r).write_bytes(b"x")
    rd.server_state(2).write_bytes(b"x")  # not a checkpoint
    for r in (1, 2, 3):  # round 3 crashed between its metrics line and its checkpoint
        rd.append_metrics({"round": r})
    assert rd.last_round() == 2
    rd.trim_metrics(rd.last_round())
    assert [r["round"] for r in rd.read_metrics()] == [1, 2]


# -- the site launcher ----------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # real processes (the site launcher)
def test_launcher_unknown_site_is_one_clear_line():
    res = run_module("client", "--site", "nosuch")
    assert res.returncode != 0 and res.stdout == ""
    assert res.stderr.strip().count("\n") == 0
    assert "unknown site 'nosuch'" in res.stderr and all(s in res.stderr for s in SITES)


@pytest.mark.slow  # real processes (the site launcher)
def test_launcher_unreachable_superlink_is_one_clear_line():
    res = run_module("client", "--site", "unicamp", f"site.superlink=127.0.0.1:{_closed_port()}")
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0
    assert "cannot reach the SuperLink at 127.0.0.1:" in res.stderr


@pytest.mark.slow  # real processes (the site launcher)
def test_launcher_runtime_port_in_use_is_one_clear_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_module("client", "--site", "unicamp", f"site.runtime_port={port}",
                         f"site.superlink=127.0.0.1:{port}")
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0, res.stderr
    assert f"site.runtime_port {port} is in use on this machine" in res.stderr


@pytest.mark.slow  # real processes (the site launcher)
def test_launcher_poll_interval_out_of_range_is_one_clear_line():
    res = run_module("client", "--site", "unicamp", "site.poll_s=0")
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "site.poll_s must be between 0.05 and 60 seconds, got 0" in res.stderr


def test_supernode_entry_caps_only_the_supernode_loops_waits():
    """client/supernode.py, in a process of its own (it patches Flower's module for that process)."""
    code = ("import time, functools; from client.supernode import shorten_waits; "
            "import flwr.supernode.start_client_internal as loop; assert shorten_waits(0.1); "
            "t = time.monotonic(); loop.time.sleep(3); capped = time.monotonic() - t; "
            "t = time.monotonic(); time.sleep(0.3); plain = time.monotonic() - t; "
            "assert isinstance(loop.pull_objects, functools.partial) and loop.pull_objects.keywords == {'initial_backoff': 0.1}; "
            "print(round(capped, 2), round(plain, 2), loop.time.monotonic is time.monotonic)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    capped, plain, same = res.stdout.split()
    assert float(capped) < 0.5 and float(plain) >= 0.3 and same == "True"  # the rest of time untouched


@pytest.mark.slow  # reads a folder through the real launcher process
def test_launcher_data_dir_without_spectra_is_one_clear_line(tmp_path):
    (tmp_path / "notes.txt").write_text("no spectra here")
    res = run_module("client", "--site", "hcfmrp", f"site.data_dir={tmp_path}")
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0
    assert "no usable spectra" in res.stderr and str(tmp_path) in res.stderr


# -- a real federation on loopback --------------------------------------------------------------------
def _count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path.exists() else 0


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("federation")
    run_dir = out / "run"
    rd, logs = RunDir(run_dir), out / "logs"
    phases: dict = {"out": out, "rd": rd, "groups": []}
    started = lambda site: _count(logs / f"supernode_{site}.log", "Receiving: train message")  # noqa: E731
    fed = LocalFederation(out, SITES, log=lambda m: None)
    try:
        with fed:
            # einstein joins before its data are ready: simulation only (site.data_dir null)
            fed.start_supernodes({k: v for k, v in prepare_site_data(out / "sites").items() if k != "einstein"})
            t0 = time.monotonic()
            phases[1] = fed.run({**RUN, "num-rounds": 2, "run-dir": str(run_dir), "min-sites": 3}, timeout_s=240)
            phases["t1"] = time.monotonic() - t0

            res2: dict = {}
            runner = threading.Thread(target=lambda: res2.update(fed.run(
                {**RUN, "num-rounds": 4, "run-dir": str(run_dir), "min-sites": 2,
                 "round-timeout-s": ROUND_TIMEOUT_S}, timeout_s=240)))
            runner.start()
            wait_for(lambda: started("hcfmrp") >= 3, 120, "round 3 to start at hcfmrp")
            fed.stop("supernode_hcfmrp", sig=signal.SIGKILL, grace_s=0)  # a site crashes mid-round: no goodbye
            wait_for(lambda: rd.last_round() >= 3, 120, "round 3 to complete without hcfmrp")
            wait_for(lambda: started("unicamp") >= 4, 60, "round 4 to start")
            fed.stop("superlink", sig=signal.SIGKILL, grace_s=1)  # the server side crashes mid-round
            runner.join(60)
            phases[2] = res2

            fed.start_superlink()  # same port, new (in-memory) state: the SuperNodes must register again
            fed.restart_supernodes()
            phases[3] = fed.run({**RUN, "num-rounds": 4, "run-dir": str(run_dir), "min-sites": 3,
                                 "wait-timeout-s": 15}, timeout_s=120)
            phases[4] = fed.run({**RUN, "num-rounds": 4, "run-dir": str(run_dir), "min-sites": 2}, timeout_s=180)
            phases["t_all"] = time.monotonic() - t0
    except Exception as exc:  # later tests report the phase that broke, with the logs to read
        phases["error"] = f"{type(exc).__name__}: {exc} (logs in {logs})"
    phases["groups"] = list(fed.pgids)
    transcript = logs / "flwr_run.log"
    phases["transcript"] = transcript.read_text(errors="replace") if transcript.exists() else ""
    return phases


def test_three_sites_two_rounds_checkpoint_and_metrics_every_round(federation):
    res, rd = phase(federation, 1), federation["rd"]
    assert res["status"] == "finished:completed", res
    rows = rd.read_metrics()
    assert [r["round"] for r in rows[:2]] == [1, 2]
    for r in rows[:2]:
        assert rd.checkpoint(r["round"]).is_file()
        assert sorted(s["site"] for s in r["sites"]) == sorted(SITES)
        # where the server's round went: encode, the sites' work and transport, validation
        assert set(r["server_seconds"]) == {"send", "wait", "check"}, r
        assert all(v >= 0 for v in r["server_seconds"].values())
        assert r["server_seconds"]["wait"] >= max(s["local_seconds"] for s in r["sites"])
        assert sum(r["server_seconds"].values()) <= r["round_seconds"]
        for s in r["sites"]:
            assert s["num_examples"] == 3 * 4 and s["loss"] > 0 and s["local_seconds"] > 0
            assert s["bytes_up"] == s["bytes_down"] > 0
            assert s["simulation_only"] is (s["site"] == "einstein"), s  # the lab sees who has no in vivo data
    log = text_of(federation["out"] / "logs" / "supernode_einstein.log")
    assert "WARNING: simulation only: no in vivo spectra (site.data_dir is null)" in log
    assert "simulation only" not in text_of(federation["out"] / "logs" / "supernode_unicamp.log")
    assert (rd.path / "encoder.safetensors").is_file() and (rd.path / "training_curve.png").is_file()


def test_the_server_writes_tensorboard_beside_its_metrics_across_the_resume(federation):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rd = federation["rd"]
    acc = EventAccumulator(str(rd.path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = rd.read_metrics()
    assert [e.step for e in acc.Scalars("round/loss")] == [r["round"] for r in rows]  # no doubles after resume
    assert [round(e.value, 5) for e in acc.Scalars("round/loss")] == [round(r["loss"], 5) for r in rows]
    assert {f"site/{s}/loss" for s in SITES} | {f"site/{s}/bytes_up" for s in SITES} <= tags
    assert [round(e.value, 3) for e in acc.Scalars("round/server_wait_seconds")] == [r["server_seconds"]["wait"]
                                                                                     for r in rows]


def test_site_killed_mid_round_the_round_aggregates_the_others(federation):
    phase(federation, 2)
    rows = {r["round"]: r for r in federation["rd"].read_metrics()}
    assert 3 in rows, "round 3 has no metrics line"
    assert sorted(s["site"] for s in rows[3]["sites"]) == ["einstein", "unicamp"]
    assert [d["site"] for d in rows[3]["dropped"]] == ["hcfmrp"]
    assert federation["rd"].checkpoint(3).is_file()
    # a SIGKILLed site sends nothing: the round waits for it at most round-timeout-s, never for good
    assert rows[3]["round_seconds"] < ROUND_TIMEOUT_S + 20, rows[3]


def test_missing_sites_fail_after_the_bounded_wait_naming_them(federation):
    res = phase(federation, 3)
    assert res["status"] == "finished:failed", res
    assert "gave up after 15 s (wait-timeout-s): 2 of the 3 required site(s) connected" in federation["transcript"]
    assert "missing: hcfmrp" in federation["transcript"]


def test_superlink_restart_resumes_from_the_last_completed_round(federation):
    res, rd = phase(federation, 4), federation["rd"]
    assert res["status"] == "finished:completed", res
    rows = rd.read_metrics()
    assert [r["round"] for r in rows] == [1, 2, 3, 4]  # continued, never restarted or repeated
    assert "resuming after round 2" in federation["transcript"]  # phase 2 continued the finished run
    assert "resuming after round 3" in federation["transcript"]  # phase 4 after the SuperLink crash
    assert all(rd.checkpoint(r).is_file() for r in (1, 2, 3, 4))
    assert sorted(s["site"] for s in rows[3]["sites"]) == ["einstein", "unicamp"]


def test_every_process_group_is_gone_afterwards(federation):
    assert len(federation["groups"]) >= 5, federation.get("error")  # SuperLink x2, SuperNodes, restarts
    deadline = time.monotonic() + 10
    while (left := {g: m for g in federation["groups"] if (m := live_members(g))}) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left in groups: {left}"
