"""Secure aggregation as it really runs: a SuperLink, four SuperNodes (one per site) and `flwr run`
on loopback, micro MAE, fl.secure_aggregation=true.

  1. round 1 with a recording app bundle (Flower's per-message ClientApp processes run the bundle's
     code): its ServerApp keeps everything it pulls from the SuperLink, its ClientApp keeps what
     each site handed SecAgg+ before masking (update, examples, loss). The new global weights are
     plain FedAvg of those updates within the stated encoding step; nothing the ServerApp received
     holds a site's weights, update or loss, and the masked vectors do not correlate with any
     site's update.
  2. the run resumed to round 2 on the sites' warm workers (the shipped bundle), one SuperNode
     killed once it has its round-2 training task (after sharing its keys): the round completes
     from the other three through SecAgg+'s recovery.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import threading

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from helpers import phase, text_of, wait_for

from mrsfm_model.model.weights import read_tensors
from server.bundle import stage_app
from server.example_sites import SITES, copy_site_configs, prepare_site_data
from server.local import LocalFederation
from server.rundir import RunDir

pytestmark = pytest.mark.slow  # real processes: a SuperLink, four SuperNodes, their ClientApps and workers

FOURTH = "site4"  # a copy of unicamp's site file (MRSFM_CONFIG_DIR)
ALL = (*SITES, FOURTH)
BOUND, LEVELS = 10.0, 2**22  # configs/fl/_secure.yaml defaults
STEP = 2 * BOUND / LEVELS  # the encoding step the docs state (4.8e-6)
# no warm-up and a plain lr: two local steps move each weight by ~1e-3, far above the encoding step
RUN = {"overrides": "model=micro data.batch_size=4 train.warmup_steps=0 train.lr=0.001 fl.secure_aggregation=true",
       "local-steps": 2,
       "sites": ",".join(ALL), "min-sites": 4, "wire-dtype": "fp32"}

RECORDING_SERVER = '''"""Test only (written by tests/test_secure_federation.py into a staged app): server/app.py's
run over a Grid that appends every message it pulls from the SuperLink to RUN_DIR/../received.pkl."""

import pickle
from pathlib import Path

from flwr.serverapp import ServerApp

from server.app import RunSettings, run_federation

app = ServerApp()


def _plain(m) -> dict:
    out = {"src": m.metadata.src_node_id, "error": m.has_error(), "arrays": {}, "configs": {}, "metrics": {}}
    if not m.has_error():
        c = m.content
        out["arrays"] = {n: {k: bytes(a.data) for k, a in r.items()} for n, r in c.array_records.items()}
        out["configs"] = {n: dict(r) for n, r in c.config_records.items()}
        out["metrics"] = {n: dict(r) for n, r in c.metric_records.items()}
    return out


class RecordingGrid:
    def __init__(self, grid, path):
        self.grid, self.path = grid, path

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def pull_messages(self, message_ids):
        got = list(self.grid.pull_messages(message_ids))
        with open(self.path, "ab") as f:
            for m in got:
                pickle.dump(_plain(m), f)
        return got


@app.main()
def main(grid, context):
    s = RunSettings.from_run_config(context.run_config)
    run_federation(RecordingGrid(grid, Path(s.run_dir).parent / "received.pkl"), s)
'''

RECORDING_CLIENT = '''"""Test only (written by tests/test_secure_federation.py into a staged app): client/app.py's
ClientApp, keeping in STATE_DIR/sent/roundN.pkl what the site hands SecAgg+ before masking."""

import pickle
from pathlib import Path

from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

import client.app as site_app
from client.secure import FITINS_CONFIG, FITINS_PARAMETERS
from mrsfm_model.model.wire import float_keys

_secure_reply = site_app.secure_reply


def recording_reply(msg, context, node, local_round, log):
    keys = str(msg.content.config_records[FITINS_CONFIG]["secure-keys"]).split(",")
    params = compat.arrayrecord_to_parameters(msg.content.array_records[FITINS_PARAMETERS], keep_input=True)
    global_ = dict(zip(keys, parameters_to_ndarrays(params)))
    seen = {}

    def recorded_round(conf, node, global_weights):
        state, metrics = local_round(conf, node, global_weights)
        seen.update(loss=float(metrics["loss"]), round=int(conf["server-round"]))
        return state, metrics

    reply = _secure_reply(msg, context, node, recorded_round, log)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    sent = parameters_to_ndarrays(fitres.parameters)
    floats = float_keys(keys, global_)
    out = Path(node["state-dir"]) / "sent"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"round{seen['round']}.pkl").write_bytes(pickle.dumps({
        "global": global_, "deltas": dict(zip(floats, sent[:-1])), "num_examples": int(fitres.num_examples),
        "loss": seen["loss"]}))
    return reply


site_app.secure_reply = recording_reply
app = site_app.app  # client/app.py's ClientApp, its secure rounds through recording_reply
'''


def recording_bundle(folder) -> object:
    """The shipped app with the two recording modules above as its ServerApp and ClientApp."""
    app = stage_app(folder)
    (app / "server" / "recording.py").write_text(RECORDING_SERVER)
    (app / "client" / "recording.py").write_text(RECORDING_CLIENT)
    pyproject = app / "pyproject.toml"
    text = pyproject.read_text()
    assert 'serverapp = "server.app:app"' in text and 'clientapp = "client.app:app"' in text
    pyproject.write_text(text.replace('serverapp = "server.app:app"', 'serverapp = "server.recording:app"')
                         .replace('clientapp = "client.app:app"', 'clientapp = "client.recording:app"'))
    return app


def _count(path, needle: str) -> int:
    return path.read_text(errors="replace").count(needle) if path.exists() else 0


@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("secure_federation")
    run_dir = out / "run"
    rd, logs = RunDir(run_dir), out / "logs"
    phases: dict = {"out": out, "rd": rd}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MRSFM_CONFIG_DIR", str(copy_site_configs(out / "configs", [FOURTH])))  # before the processes
        fed = LocalFederation(out, ALL, log=lambda m: None)
        try:
            fed.start_superlink(timeout_s=180)  # a loaded machine: more than the default 30 s
            fed.data_dirs.update(prepare_site_data(out / "sites", ALL))
            for site in ALL:  # Flower's per-message ClientApp processes: the bundle's own code runs
                fed.start_supernode(site, worker=False)
            # each of a secure round's 4 messages starts a fresh ClientApp process per site (torch
            # imported 16 times): minutes on a loaded 2-core machine
            phases[1] = fed.run({**RUN, "num-rounds": 1, "run-dir": str(run_dir)}, timeout_s=1500,
                                app=recording_bundle(out / "recording"))
            fed.stop(*[f"supernode_{site}" for site in ALL], grace_s=5.0)
            for site in ALL:  # the shipped bundle on the sites' warm workers
                fed.start_supernode(site)
            # a secure round sends each site 4 train messages (setup, keys, training, unmask): the 7th
            # is its round-2 training task, so it dies having shared its keys, before its masked update
            victim = SITES[1]
            res: dict = {}
            runner = threading.Thread(target=lambda: res.update(fed.run(
                # long enough for a cold worker's first round on a loaded machine; the victim's stage waits it out
                {**RUN, "num-rounds": 2, "run-dir": str(run_dir), "round-timeout-s": 120}, timeout_s=600)))
            runner.start()
            wait_for(lambda: _count(logs / f"supernode_{victim}.log", "Receiving: train message") >= 7, 300,
                     f"round 2's training task at {victim}")
            fed.stop(f"supernode_{victim}", sig=signal.SIGKILL, grace_s=0)
            runner.join(600)
            phases[2] = res
            phases["victim"] = victim
        except Exception as exc:
            phases["error"] = f"{type(exc).__name__}: {exc} (logs in {logs})"
        finally:
            fed.close()
    transcript = logs / "flwr_run.log"
    phases["transcript"] = transcript.read_text(errors="replace") if transcript.exists() else ""
    return phases


def _sent(out, site: str, rnd: int) -> dict:
    return pickle.loads((out / "state" / site / "sent" / f"round{rnd}.pkl").read_bytes())


def _received(out) -> list[dict]:
    found = []
    with open(out / "received.pkl", "rb") as f:
        while True:
            try:
                found.append(pickle.load(f))
            except EOFError:
                return found


def _fedavg(sent: list[dict]) -> dict[str, np.ndarray]:
    """Plain FedAvg of the sites' updates (float64), added to the round's global weights."""
    w = np.array([s["num_examples"] for s in sent], dtype=np.float64)
    return {k: sent[0]["global"][k].astype(np.float64)
            + sum(wi * s["deltas"][k].astype(np.float64) for wi, s in zip(w, sent)) / w.sum()
            for k in sent[0]["deltas"]}


def _max_diff(a: dict[str, np.ndarray], b: dict) -> float:
    return max(float(np.abs(a[k] - np.asarray(b[k], dtype=np.float64)).max()) for k in a)


def test_the_secure_round_is_plain_fedavg_of_the_same_updates_within_one_step(secure_federation):
    res, rd, out = phase(secure_federation, 1), secure_federation["rd"], secure_federation["out"]
    assert res["status"] == "finished:completed", (res, secure_federation["transcript"][-3000:])
    [row] = rd.read_metrics()[:1]
    assert row["round"] == 1 and row["wire_dtype"] == "secagg" and row["num_sites"] == 4
    assert row["secure_aggregation"]["shares"] == 4 and row["secure_aggregation"]["threshold"] == 3
    assert sorted(s["site"] for s in row["sites"]) == sorted(ALL)
    sent = [_sent(out, site, 1) for site in ALL]
    for s in sent[1:]:  # every site got the same global weights
        assert all(np.array_equal(s["global"][k], sent[0]["global"][k]) for k in sent[0]["global"])
    assert [s["num_examples"] for s in sent] == [2 * 4] * 4
    norms = [float(np.sqrt(sum(np.square(d.astype(np.float64)).sum() for d in s["deltas"].values()))) for s in sent]
    assert all(0.1 < n <= BOUND for n in norms), norms  # real updates, within the bound (none clipped)
    checkpoint = {k: v.numpy() for k, v in read_tensors(rd.checkpoint(1)).items()}
    diff = _max_diff(_fedavg(sent), checkpoint)
    assert diff <= STEP + 1e-6, diff  # one step, plus float32 rounding of global + average
    # the comparison can tell: FedAvg of any three of the four sites is far off
    assert min(_max_diff(_fedavg(sent[:i] + sent[i + 1:]), checkpoint) for i in range(4)) > 20 * STEP
    assert row["loss"] == pytest.approx(np.mean([s["loss"] for s in sent]), abs=1e-3)


def test_nothing_the_serverapp_received_holds_a_site_update_or_loss(secure_federation):
    phase(secure_federation, 1)
    out = secure_federation["out"]
    received = _received(out)
    assert received, "the recording ServerApp received nothing"
    assert all(not data for m in received for rec in m["arrays"].values() for data in rec.values())
    blob, floats, masked = b"", [], []
    for m in received:
        for rec in list(m["configs"].values()) + list(m["metrics"].values()):
            for key, v in rec.items():
                for x in v if isinstance(v, list) else [v]:
                    if isinstance(x, bytes):
                        blob += x
                    elif isinstance(x, float):
                        floats.append(x)
                if key == Key.MASKED_PARAMETERS:
                    masked.append([bytes_to_ndarray(b) for b in v])
    assert len(masked) == 4  # one masked vector per site, nothing else of the update
    sent = {site: _sent(out, site, 1) for site in ALL}
    for site, s in sent.items():
        keys = sorted(s["deltas"], key=lambda k: -s["deltas"][k].size)[:6]
        for k in keys:  # neither the update nor the trained weights, as float32, float64 or bf16
            d = s["deltas"][k].astype(np.float32).ravel()
            w = (s["global"][k] + s["deltas"][k]).astype(np.float32).ravel()
            for start in (0, d.size // 2, d.size - 8):
                for x in (d[start:start + 8], w[start:start + 8]):
                    assert np.any(x != 0)
                    for raw in (x.tobytes(), x.astype(np.float64).tobytes(), (x.view(np.uint32) >> 16)
                                .astype(np.uint16).tobytes()):
                        assert raw not in blob, (site, k)
        assert not any(f == pytest.approx(s["loss"], rel=1e-6) for f in floats), (site, s["loss"])
        # each masked vector is uniform noise to anyone without the masks: no correlation with any
        # site's update, where the same update merely encoded (no masks) correlates almost fully
        flat = np.concatenate([d.ravel() for d in s["deltas"].values()]).astype(np.float64)
        encoded = np.concatenate([q.ravel() for q in quantize(list(s["deltas"].values()), BOUND, LEVELS)])
        assert np.corrcoef(flat, encoded.astype(np.float64))[0, 1] > 0.99
        for vec in masked:
            values = np.concatenate([a.ravel() for a in vec[1:]])[:flat.size].astype(np.float64)
            assert abs(np.corrcoef(flat, values)[0, 1]) < 0.02, site
    # and what the coordinator wrote: its metrics and its log carry no site's loss
    written = secure_federation["rd"].metrics.read_text() + secure_federation["transcript"]
    for s in sent.values():
        assert f"{s['loss']:.4f}" not in written and f"{s['loss']:.6g}" not in written


def test_a_site_killed_mid_round_the_round_completes_from_the_other_three(secure_federation):
    res, rd = phase(secure_federation, 2), secure_federation["rd"]
    rows = {r["round"]: r for r in rd.read_metrics()}
    assert 2 in rows, (res, secure_federation["transcript"][-3000:])
    assert "resuming after round 1" in secure_federation["transcript"]
    victim = secure_federation["victim"]
    assert sorted(s["site"] for s in rows[2]["sites"]) == sorted(set(ALL) - {victim})
    [dropped] = rows[2]["dropped"]
    # its restarted SuperNode has a new node id, named by its first reply: it died before sending one
    assert dropped["site"] in (victim, f"node {dropped['node_id']}") and dropped["error"], dropped
    assert dropped["node_id"] not in {s["node_id"] for s in rows[2]["sites"]}
    assert rows[2]["loss"] > 0 and all("loss" not in s and s["num_examples"] == 8 for s in rows[2]["sites"])
    assert rd.checkpoint(2).is_file() and (rd.path / "encoder.safetensors").is_file()
    # the warm workers' own logs hold each survivor's loss; the coordinator's files do not
    out = secure_federation["out"]
    own = [m for site in set(ALL) - {victim} for m in re.findall(
        r"round 2: 2 steps in [\d.]+ s, loss (\d+\.\d{4})", text_of(out / "logs" / f"supernode_{site}.log"))]
    assert len(own) == 3, own
    written = rd.metrics.read_text() + secure_federation["transcript"]
    assert not [x for x in own if x in written], "a site's loss reached the coordinator"
    assert os.path.isfile(rd.checkpoint(1))
