"""Secure aggregation (fl.secure_aggregation=true) without processes: the settings and their
refusals, the checks a site makes before masking, and whole SecAgg+ rounds in one process
(Flower's workflow on the server side, Flower's client mod on each simulated site) compared with
plain FedAvg of the same updates. The real-process runs are in test_secure_federation.py."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.secure import UpdateRefused, clipped_update, secure_mod, secure_reply
from mrsfm_model.config import load_config
from mrsfm_model.model.mae import build_mae
from mrsfm_model.model.wire import LOSS_CAP, as_fp32_record
from server.secure import SecAggSettings, _Collector, check_run, secure_round
from server.strategy import make_strategy


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """Messages made here are made as in a ServerApp (Flower reads the run and node from its task)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def fl(**secagg) -> dict:
    cfg = load_config(["+fl=fedavg", "fl.secure_aggregation=true",
                       *(f"fl.secagg.{k}={v}" for k, v in secagg.items())])
    return cfg.fl


# -- settings and refusals ----------------------------------------------------------------------------


def test_off_by_default_in_every_strategy():
    for name in ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"):
        cfg = load_config([f"+fl={name}"])
        assert cfg.fl.secure_aggregation is False and check_run(cfg.fl, name, 2, 3) is None


def test_defaults_protect_3_to_20_sites_and_tolerate_a_dropout():
    s = check_run(fl(), "fedavg", 3, 20)
    for n in range(3, 21):
        shares, t = s.resolve(n)
        assert shares == n and 2 * t > shares and shares - t >= 1, (n, shares, t)
    assert s.step == pytest.approx(2 * 10.0 / 2**22)


@pytest.mark.parametrize("n", [3, 4, 5, 7, 12, 20])
@pytest.mark.parametrize("shares,threshold", [(1.0, 0.67), (0.6, 0.75), (3, 2), (5, 0.8)])
def test_resolve_is_what_flowers_setup_stage_computes(n, shares, threshold):
    from flwr.common import FitIns, Parameters
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    s = SecAggSettings(shares, threshold, 1.0, 2**22, 2**32)
    if isinstance(shares, int) and shares > n:
        return
    state = WorkflowState()
    ctx = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=_Collector(list(range(10, 10 + n)),
                                                                                   FitIns(Parameters([], ""), {})))
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": 1})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()

    class Silent:
        def send_and_receive(self, messages, *, timeout=None):
            list(messages)
            return []

    s.workflow(1, 1.0).setup_stage(Silent(), ctx, state)
    assert s.resolve(n) == (state.num_shares, state.threshold)


@pytest.mark.parametrize("settings,strategy,min_sites,expected,needle", [
    ({}, "fedavg", 2, 3, "fl.secure_aggregation=true needs at least 3 sites per round"),
    ({}, "fedmedian", 3, 3, "fl.secure_aggregation=true needs an averaging strategy"),
    ({"reconstruction_threshold": 0.5}, "fedavg", 4, 4, "fl.secagg.reconstruction_threshold 0.5 is 2 of 4 shares"),
    ({"reconstruction_threshold": 0.4}, "fedprox", 5, 5, "not more than half"),
    ({"num_shares": 5}, "fedavg", 3, 3, "fl.secagg.num_shares 5 is 5 shares, more than the 3 sites"),
    ({"num_shares": 5, "reconstruction_threshold": 4}, "fedavg", 3, 6, "more than the 3 sites"),
    ({"reconstruction_threshold": 6}, "fedavg", 3, 5, "fl.secagg.reconstruction_threshold 6 is 6 shares"),
    ({"modulus_range": 2**24}, "fedavg", 3, 5, "allows at most 3 sites"),
])
def test_a_threshold_that_cannot_protect_is_refused_in_one_line(settings, strategy, min_sites, expected, needle):
    with pytest.raises(ValueError) as err:
        check_run(fl(**settings), strategy, min_sites, expected)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("key,value,needle", [
    ("update_norm_bound", 0, "fl.secagg.update_norm_bound must be > 0"),
    ("modulus_range", 3000000000, "fl.secagg.modulus_range must be a power of 2"),
    ("num_shares", 2.5, "fl.secagg.num_shares must be a fraction"),
    ("reconstruction_threshold", "abc", "fl.secagg.reconstruction_threshold must be a number"),
])
def test_bad_values_are_refused_naming_the_setting(key, value, needle):
    with pytest.raises(ValueError, match=needle):
        check_run(fl(**{key: value}), "fedavg", 3, 3)


def test_the_server_refuses_the_run_before_writing_anything(tmp_path, monkeypatch):
    from server.app import RunSettings, run_federation

    monkeypatch.chdir(tmp_path)
    s = RunSettings(overrides="model=micro fl.secure_aggregation=true fl.secagg.reconstruction_threshold=0.5",
                    num_rounds=1, local_steps=1, run_dir="run", min_sites=4, wait_timeout_s=1.0, wire_dtype="bf16",
                    strategy="fedavg", sites="", round_timeout_s=10.0, local_sleep_s=0.0)
    with pytest.raises(ValueError, match="fl.secagg.reconstruction_threshold 0.5 is 2 of 4 shares"):
        run_federation(None, s)
    assert not (tmp_path / "run").exists()


# -- the site's checks before masking ----------------------------------------------------------------


def test_a_non_finite_update_is_stopped_at_the_site():
    g = {"w": np.zeros(4, np.float32)}
    with pytest.raises(UpdateRefused, match=r"non-finite values in w \(1 NaN, 1 Inf\)"):
        clipped_update({"w": np.array([0, np.nan, np.inf, 1], np.float32)}, g, ["w"], 1.0)


def test_an_over_bound_update_is_clipped_at_the_site_keeping_its_direction():
    g = {"a": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}
    state = {"a": np.array([4, 1, 1], np.float32), "b": np.array([0, 4], np.float32)}
    deltas, norm = clipped_update(state, g, ["a", "b"], 2.0)
    assert norm == pytest.approx(math.hypot(3, 4))
    flat = np.concatenate(deltas)
    assert np.linalg.norm(flat) == pytest.approx(2.0, rel=1e-6)
    assert flat / np.linalg.norm(flat) == pytest.approx(np.array([3, 0, 0, 0, 4]) / 5, abs=1e-6)
    small, _ = clipped_update({"a": np.array([1.5, 1, 1], np.float32), "b": np.zeros(2, np.float32)}, g, ["a", "b"], 2.0)
    assert np.concatenate(small) == pytest.approx([0.5, 0, 0, 0, 0])  # within the bound: unchanged


# -- whole SecAgg+ rounds in one process ---------------------------------------------------------------


class Sites:
    """Each node: a Context (the mod keeps its protocol state there, as a SuperNode does) and the
    ClientApp's secure handler with a scripted local round. `received` is everything the server got."""

    def __init__(self, states: dict[int, dict[str, torch.Tensor]], losses: dict[int, float],
                 examples: dict[int, int], fail: dict[int, int] | None = None):
        self.states, self.losses, self.examples = states, losses, examples
        self.fail = dict(fail or {})  # node -> protocol stage (0..3) from which it is gone
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in states}
        self.stage: dict[int, int] = {}
        self.received: list[RecordDict] = []
        self.sites: dict[int, str] = {}
        self.said: list[str] = []

    # what WireGrid offers the secure round
    def wait_for_sites(self) -> list[int]:
        return sorted(self.states)

    def name_site(self, node, content):
        self.sites[node] = str(content.config_records["site"]["site"])

    def _exchange(self, messages, timeout):
        replies = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"{m.metadata.dst_node_id}-{i}-{id(m)}"
            node = m.metadata.dst_node_id
            stage = self.stage.get(node, 0)
            self.stage[node] = stage + 1
            if node in self.fail and stage >= self.fail[node]:
                continue  # killed: never answers
            # what the site gets is its own copy (Flower's mod edits the message it is given)
            mine = Message(copy.deepcopy(m.content), dst_node_id=node, message_type=m.metadata.message_type,
                           group_id=m.metadata.group_id)
            mine.metadata.__dict__["_message_id"] = m.metadata.message_id
            try:
                reply = secure_mod(mine, self.contexts[node], lambda msg, ctx, node=node: self.train(msg, ctx, node))
            except Exception as exc:  # as Flower's ClientApp runtime answers: an error reply
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc)}:<'{exc}'>"), reply_to=mine)
            reply.metadata.__dict__["_src_node_id"] = node  # as the SuperLink stamps it
            if not reply.has_error():
                self.received.append(reply.content)
            replies.append(reply)
        return replies

    def train(self, msg, ctx, node):
        def local_round(conf, n, global_weights):
            template = {k: v.clone() for k, v in self.states[node].items()}
            global_weights(template)  # the key check
            assert int(conf["server-round"]) >= 1
            return self.states[node], {"num-examples": self.examples[node], "loss": self.losses[node],
                                       "local-seconds": 1.5, "build-seconds": 0.0}
        return secure_reply(msg, ctx, {"site": f"site{node}"}, local_round, self.said.append)


def _micro_round(n_sites: int, fail=None, strategy="fedavg", bound=10.0, seed=0, examples=None, tamper=None):
    torch.manual_seed(seed)
    cfg = load_config(["model=micro"])
    model = build_mae(cfg.model, cfg.data)
    global_ = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    # site updates about the size of a few local steps (norms ~0.5-2 on the micro model's 0.2M weights)
    states = {10 + i: {k: v + 2e-3 * (i + 1) * torch.randn(v.shape, generator=gen) for k, v in global_.items()}
              for i in range(n_sites)}
    losses = {n: 0.1 + 0.05 * i for i, n in enumerate(states)}
    examples = examples or {n: 12 for n in states}
    if tamper is not None:  # a broken site: tamper(states, losses) edits them in place
        tamper(states, losses)
    sites = Sites(states, losses, examples, fail)
    settings = SecAggSettings(1.0, 0.67, bound, 2**22, 2**32)
    strat = make_strategy(strategy, load_config([f"+fl={strategy}"]).fl, n_sites)
    arrays = as_fp32_record(global_)
    config = ConfigRecord({"overrides": "model=micro", "strategy": strategy, "local-steps": 3, "total-steps": 6,
                           "wire-dtype": "bf16", "local-sleep-s": 0.0, "run-key": "k"})
    new, out = secure_round(sites, strat, settings, strategy, 1, arrays, config, 5.0, 12)
    return global_, states, losses, examples, sites, settings, new, out


def _plain_fedavg(global_, states, examples, nodes):
    w = np.array([min(examples[n], 12) for n in nodes], dtype=np.float64)
    return {k: sum(wi * states[n][k].double() for wi, n in zip(w, nodes)) / w.sum() for k in global_}


def test_secure_fedavg_equals_plain_fedavg_within_one_encoding_step():
    global_, states, losses, examples, sites, settings, new, out = _micro_round(3)
    assert out.ok, out.error
    plain = _plain_fedavg(global_, states, examples, sorted(states))
    diff = max(float((torch.from_numpy(new[k].numpy()).double() - plain[k]).abs().max()) for k in plain)
    # stated precision (docs/privacy.md): within 2 x bound / quantization_range of plain FedAvg (4.8e-6 here),
    # plus float32 rounding of the sum
    assert diff <= settings.step + 1e-6, diff
    err = torch.cat([(torch.from_numpy(new[k].numpy()).double() - plain[k]).flatten() for k in plain])
    print(f"secure - plain FedAvg over {err.numel()} weights: max {diff:.3g}, rms {float(err.square().mean().sqrt()):.3g}, "
          f"mean {float(err.mean()):.2g} (step {settings.step:.3g})")
    assert out.loss == pytest.approx(np.mean(list(losses.values())), abs=LOSS_CAP * settings.step * 2)
    assert [x["site"] for x in out.sites] == ["site10", "site11", "site12"] and out.dropped == []
    assert all(x["num_examples"] == 12 for x in out.sites)


def test_the_server_receives_no_site_loss_and_no_site_weights():
    global_, states, losses, examples, sites, settings, new, out = _micro_round(3)
    assert out.ok
    seen_floats, seen_bytes = [], b""
    for content in sites.received:
        assert all(len(a.data) == 0 for rec in content.array_records.values() for a in rec.values())
        for rec in list(content.config_records.values()) + list(content.metric_records.values()):
            for v in rec.values():
                for x in v if isinstance(v, list) else [v]:
                    if isinstance(x, float):
                        seen_floats.append(x)
                    elif isinstance(x, bytes):
                        seen_bytes += x
    assert not any(x == pytest.approx(loss) for loss in losses.values() for x in seen_floats), seen_floats
    assert seen_bytes  # keys, shares and masked vectors did arrive
    for state in states.values():  # neither a site's weights nor its update, in float32 or float64
        for k in [k for k in global_ if global_[k].numel() >= 8][:5]:
            w = state[k].numpy().astype(np.float32).ravel()[:8]
            d = (state[k] - global_[k]).numpy().astype(np.float32).ravel()[:8]
            for x in (w, d, w.astype(np.float64), d.astype(np.float64)):
                assert x.tobytes() not in seen_bytes, k
    assert all(set(x["metrics"]) <= {"num-examples", "local-seconds", "build-seconds"} for x in out.sites)


def test_num_examples_are_capped_at_the_site_as_the_server_caps_them():
    global_, states, losses, examples, sites, settings, new, out = _micro_round(3, examples={10: 10**9, 11: 12, 12: 6})
    assert out.ok
    assert [x["num_examples"] for x in out.sites] == [12, 12, 6]
    plain = _plain_fedavg(global_, states, {10: 12, 11: 12, 12: 6}, sorted(states))
    diff = max(float((torch.from_numpy(new[k].numpy()).double() - plain[k]).abs().max()) for k in plain)
    assert diff <= 2 * settings.step + 1e-6


def test_a_site_lost_after_sharing_its_keys_the_round_completes_from_the_others():
    # 4 sites, 3 of 4 shares rebuild a secret: node 13 dies before sending its masked update
    global_, states, losses, examples, sites, settings, new, out = _micro_round(4, fail={13: 2})
    assert out.ok, out.error
    assert [x["site"] for x in out.sites] == ["site10", "site11", "site12"]
    assert [d["node_id"] for d in out.dropped] == [13]
    plain = _plain_fedavg(global_, states, examples, [10, 11, 12])
    diff = max(float((torch.from_numpy(new[k].numpy()).double() - plain[k]).abs().max()) for k in plain)
    assert diff <= settings.step + 1e-6, diff


def _nan_weights(states, losses):
    w = states[13]["patch_embed.proj.weight"]
    w.view(-1)[:3] = float("nan")


def _inf_loss(states, losses):
    losses[13] = float("inf")


@pytest.mark.parametrize("tamper,why", [(_nan_weights, "non-finite values in patch_embed.proj.weight (3 NaN)"),
                                        (_inf_loss, "non-finite loss (inf)")])
def test_a_non_finite_site_is_stopped_at_the_site_and_the_round_goes_on_without_it(tamper, why):
    # 4 sites, node 13 broken: it shared its keys, then refuses to send; SecAgg+ unmasks the others
    global_, states, losses, examples, sites, settings, new, out = _micro_round(4, tamper=tamper)
    assert out.ok, out.error
    assert [x["node_id"] for x in out.sites] == [10, 11, 12]
    [dropped] = out.dropped
    assert dropped["node_id"] == 13 and why in dropped["error"] and "is not sent" in dropped["error"], dropped
    plain = _plain_fedavg(global_, states, examples, [10, 11, 12])
    diff = max(float((torch.from_numpy(new[k].numpy()).double() - plain[k]).abs().max()) for k in plain)
    assert diff <= settings.step + 1e-6, diff
    assert all(np.isfinite(new[k].numpy()).all() for k in global_)
    assert out.loss == pytest.approx(np.mean([losses[n] for n in (10, 11, 12)]), abs=LOSS_CAP * settings.step * 2)
    # node 13 sent nothing of the training stage: the server got its setup and key replies only
    assert len(sites.received) == 4 + 4 + 3 + 3


def test_too_many_lost_the_round_fails_in_one_line_and_keeps_the_weights():
    global_, states, losses, examples, sites, settings, new, out = _micro_round(3, fail={11: 1, 12: 1})
    assert not out.ok and "secure aggregation did not complete" in out.error and "\n" not in out.error
    assert all(torch.equal(torch.from_numpy(new[k].numpy()), global_[k]) for k in global_)


def test_fedadam_takes_its_server_step_from_the_secure_average():
    global_, states, losses, examples, sites, settings, new, out = _micro_round(3, strategy="fedadam")
    assert out.ok
    moved = max(float((torch.from_numpy(new[k].numpy()) - global_[k]).abs().max()) for k in global_)
    assert 0 < moved <= 1.5e-3  # Adam with eta 1e-3 moves each weight by about eta, not by the average itself


def test_an_update_above_the_bound_is_clipped_and_the_round_says_nothing_about_whom():
    global_, states, losses, examples, sites, settings, new, out = _micro_round(3, bound=0.5)
    assert out.ok and out.aggregate_norm <= 0.5 + 1e-3
    assert any("clipped to the agreed bound 0.5" in line for line in sites.said)  # the site's own log


def test_plain_train_messages_pass_the_mod_untouched():
    msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=3, message_type="train")
    seen = []
    secure_mod(msg, Context(1, 3, {}, RecordDict(), {}), lambda m, c: seen.append(m) or m)
    assert seen == [msg] and RECORD_KEY_CONFIGS not in msg.content.config_records
