"""Secure aggregation (fl.secure_aggregation=true): every round's weighted average is computed by
Flower's SecAgg+ (Bell et al. 2020), so the coordinator never holds one site's update.

Flower 1.41 ships SecAgg+ for its legacy fit workflow only (`SecAggPlusWorkflow`, driven by a
`LegacyContext` and a legacy `Strategy`); this ServerApp runs Message-API strategies. So a secure
round is driven here, with Flower's pieces used as they are:
  1. the strategy's own `configure_train` (bounded wait for sites, global round number, FedProx's
     mu, FedAdam's current weights) gives the round's sites and config;
  2. `SecAggPlusWorkflow` runs its four stages (setup, share keys, collect masked vectors, unmask)
     over the Grid; its legacy-strategy hooks are `_Collector`, which hands it the round's FitIns
     and takes back the unmasked aggregate (the weighted mean of the sites' clipped updates and
     losses: client/secure.py) and the counts of the sites that took part;
  3. the aggregate update is added to the global weights and given to the strategy's own
     `aggregate_train` as a single reply (FedAvg/FedProx: kept as is; FedAdam: its server step).
Sites run Flower's `secaggplus_mod` (client/secure.py). Dropouts are SecAgg+'s: a site lost after
sharing its keys is unmasked from its neighbours' shares when at least the threshold of them
answer; otherwise the round fails with one line and the run goes on to the next round.

What the server checks instead of each update (it cannot see them): the aggregate is finite and
its norm within the agreed bound (the mean of updates clipped to the bound cannot exceed it; a
larger one means a site did not clip: the round is not applied).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from mrsfm_model.model.wire import SITE_METRICS, decode_loss, float_keys

SECURE_STRATEGIES = ("fedavg", "fedprox", "fedadam")  # averaging: the sum of the updates is all they need


def _flower_number(x: float) -> int | float:
    """Flower's convention: a fraction in (0, 1] or an integer count (> 1)."""
    return float(x) if x <= 1 else int(x)


@dataclass(frozen=True)
class SecAggSettings:
    """fl.secagg (configs/fl/_secure.yaml), read when fl.secure_aggregation is true."""

    num_shares: float
    reconstruction_threshold: float
    update_norm_bound: float
    quantization_range: int
    modulus_range: int

    @classmethod
    def of(cls, fl_cfg: Mapping | None) -> SecAggSettings | None:
        """The settings when `fl_cfg` turns secure aggregation on, else None. ValueError (one line,
        naming the setting) for a value that is not a number or out of range."""
        if not fl_cfg or not bool(fl_cfg.get("secure_aggregation", False)):
            return None
        sa = fl_cfg.get("secagg") or {}
        out = {}
        for f in ("num_shares", "reconstruction_threshold", "update_norm_bound", "quantization_range",
                  "modulus_range"):
            v = sa.get(f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"fl.secagg.{f} must be a number, got {v!r}")
            out[f] = v
        s = cls(**out)
        s.check_values()
        return s

    def check_values(self) -> None:
        for name in ("num_shares", "reconstruction_threshold"):
            v = getattr(self, name)
            if not (0 < v <= 1 or (v > 1 and float(v) == int(v))):
                raise ValueError(f"fl.secagg.{name} must be a fraction in (0, 1] or a whole count, got {v}")
        if not self.update_norm_bound > 0:
            raise ValueError(f"fl.secagg.update_norm_bound must be > 0, got {self.update_norm_bound}")
        if int(self.quantization_range) != self.quantization_range or self.quantization_range < 2:
            raise ValueError(f"fl.secagg.quantization_range must be a whole number >= 2, got {self.quantization_range}")
        m = self.modulus_range
        if int(m) != m or int(m) <= self.quantization_range or bin(int(m)).count("1") != 1 or m > 2**32:
            raise ValueError(f"fl.secagg.modulus_range must be a power of 2 above quantization_range and at most "
                             f"2**32, got {m}")

    @property
    def step(self) -> float:
        """The encoding's step: each coordinate of each site's update is rounded (stochastically,
        unbiased) to a multiple of it."""
        return 2 * self.update_norm_bound / self.quantization_range

    @property
    def max_sites(self) -> int:
        """Sites whose encoded values (each < quantization_range) sum below modulus_range."""
        return int(self.modulus_range) // int(self.quantization_range) - 1

    def resolve(self, n: int) -> tuple[int, int]:
        """(shares, threshold) for a round of `n` sites, as SecAggPlusWorkflow's setup stage computes them."""
        shares_cfg, thr_cfg = _flower_number(self.num_shares), _flower_number(self.reconstruction_threshold)
        if isinstance(shares_cfg, float):
            shares = round(shares_cfg * n)
            if shares < n and shares & 1 == 0:
                shares += 1
            if shares <= 2:
                shares = n
        else:
            shares = shares_cfg
        threshold = max(round(thr_cfg * shares), 2) if isinstance(thr_cfg, float) else thr_cfg
        if n != shares and shares & 1 == 0:
            shares += 1  # (Flower's setup stage: after the threshold is fixed)
        return shares, threshold

    def refusal(self, strategy: str, site_counts: Iterable[int]) -> str | None:
        """One line on why a run (or round) with these numbers of sites cannot be protected, or None."""
        if strategy not in SECURE_STRATEGIES:
            return (f"fl.secure_aggregation=true needs an averaging strategy ({', '.join(SECURE_STRATEGIES)}), "
                    f"not {strategy}: it works on each site's own update, which secure aggregation hides")
        for n in sorted(set(site_counts)):
            if n < 3:
                return (f"fl.secure_aggregation=true needs at least 3 sites per round, the run allows {n} (min-sites): "
                        "with 2, each site can subtract its own update from the average and read the other's")
            if n > self.max_sites:
                return (f"fl.secagg.modulus_range / quantization_range allows at most {self.max_sites} sites, "
                        f"the run has {n}: the masked sum would overflow")
            shares, t = self.resolve(n)
            if shares > n:
                return (f"fl.secagg.num_shares {self.num_shares:g} is {shares} shares, more than the {n} sites "
                        "of a round: fewer sites than the secret sharing needs")
            if t > shares or t > n:
                return (f"fl.secagg.reconstruction_threshold {self.reconstruction_threshold:g} is {t} shares, "
                        f"more than the {min(shares, n)} there are with {n} sites: no secret could be rebuilt")
            if 2 * t <= shares:
                return (f"fl.secagg.reconstruction_threshold {self.reconstruction_threshold:g} is {t} of {shares} "
                        f"shares with {n} sites, not more than half: a coordinator could rebuild both secrets of "
                        "one site from two groups of its neighbours and unmask its update (use > 0.5, e.g. 0.67)")
        return None

    def workflow(self, max_weight: float, timeout: float | None):
        from flwr.server.workflow import SecAggPlusWorkflow

        return SecAggPlusWorkflow(
            num_shares=_flower_number(self.num_shares),
            reconstruction_threshold=_flower_number(self.reconstruction_threshold),
            max_weight=float(max_weight), clipping_range=float(self.update_norm_bound),
            quantization_range=int(self.quantization_range), modulus_range=int(self.modulus_range),
            timeout=timeout)


def check_run(fl_cfg, strategy: str, min_sites: int, expected_sites: int) -> SecAggSettings | None:
    """The run's secure-aggregation settings (None: off), or ValueError with one line naming the
    setting when its threshold cannot protect the run's rounds (from min-sites to the expected sites)."""
    s = SecAggSettings.of(fl_cfg)
    if s is not None and (why := s.refusal(strategy, range(min_sites, max(min_sites, expected_sites) + 1))):
        raise ValueError(why)
    return s


# -- the round -------------------------------------------------------------------------------------


@dataclass
class SecureOutcome:
    """One secure round, as far as the coordinator may know it."""

    ok: bool
    loss: float | None = None
    sites: list[dict] = field(default_factory=list)  # took part: node, counts, timings, DP accounting
    dropped: list[dict] = field(default_factory=list)
    error: str = ""
    shares: int = 0
    threshold: int = 0
    aggregate_norm: float | None = None
    seconds: float = 0.0


class _Proxy:
    """What SecAggPlusWorkflow needs of a legacy ClientProxy: the node id."""

    def __init__(self, node_id: int):
        self.node_id = node_id
        self.cid = str(node_id)


class _Collector(Strategy):
    """The legacy Strategy hooks of SecAggPlusWorkflow: this round's FitIns out, the unmasked
    aggregate and the participants' plain-text counts in. Nothing else of the legacy API is used."""

    def __init__(self, nodes: list[int], fit_ins: FitIns):
        self.nodes, self.fit_ins = nodes, fit_ins
        self.aggregate: list[np.ndarray] | None = None
        self.results: dict[int, tuple[int, dict]] = {}  # node -> (num_examples, metrics) as sent in the clear
        self.failures = 0

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(n), self.fit_ins) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.failures = len(failures)
        for proxy, res in results:
            self.results[proxy.node_id] = (int(res.num_examples), dict(res.metrics))
        if results:  # the workflow sets every result's parameters to the unmasked aggregate
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _content_bytes(content: RecordDict) -> int:
    """Array data plus bytes and strings of config records: what a protocol message carries."""
    n = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for rec in content.config_records.values():
        for v in rec.values():
            for x in v if isinstance(v, list) else [v]:
                n += len(x) if isinstance(x, (bytes, str)) else 8
    return n


class _ProtocolGrid:
    """The Grid SecAggPlusWorkflow talks through: the WireGrid's fast polling exchange, bytes per
    node, site names from the training stage's replies, and why a node's reply was an error."""

    def __init__(self, wgrid):
        self.wgrid = wgrid
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        self.stage = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for m in messages:
            self.down[m.metadata.dst_node_id] = self.down.get(m.metadata.dst_node_id, 0) + _content_bytes(m.content)
        replies = self.wgrid._exchange(messages, timeout)
        to_node = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = set()
        for r in replies:
            node = to_node.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            answered.add(node)
            if r.has_error():
                self.errors[node] = f"stage {self.stage}: {r.error.reason}"
                continue
            self.up[node] = self.up.get(node, 0) + _content_bytes(r.content)
            if "site" in r.content.config_records:
                self.wgrid.name_site(node, r.content)
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.errors.setdefault(m.metadata.dst_node_id, f"stage {self.stage}: no reply within {timeout} s")
        self.stage += 1
        return [r for r in replies if not r.has_error()]


def secure_round(wgrid, strategy, settings: SecAggSettings, strategy_name: str, local_round: int,
                 arrays: ArrayRecord, train_config: ConfigRecord, timeout: float | None,
                 examples_per_update: int) -> tuple[ArrayRecord, SecureOutcome]:
    """One round through SecAgg+ (module docstring): (the new global weights, what the coordinator
    learnt). A round that cannot complete returns the weights unchanged and `ok` False."""
    t0 = time.monotonic()
    msgs = list(strategy.configure_train(local_round, arrays, train_config, wgrid))
    nodes = [m.metadata.dst_node_id for m in msgs]
    if why := settings.refusal(strategy_name, [len(nodes)]):
        raise ValueError(why)
    shares, threshold = settings.resolve(len(nodes))
    rnd = local_round + int(getattr(strategy, "round_offset", 0))
    keys = list(arrays.keys())
    global_ = {k: arrays[k].numpy() for k in keys}
    floats = float_keys(keys, global_)
    config = {k: v for k, v in msgs[0].content["config"].items() if not isinstance(v, list)}
    fit_ins = FitIns(ndarrays_to_parameters([global_[k] for k in keys]),
                     {**config, "secure-keys": ",".join(keys), "update-norm-bound": float(settings.update_norm_bound),
                      "max-examples": int(examples_per_update)})
    collector = _Collector(nodes, fit_ins)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=collector)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    pgrid = _ProtocolGrid(wgrid)
    settings.workflow(examples_per_update, timeout)(pgrid, context)

    def site(node: int) -> str:
        return wgrid.sites.get(node, f"node {node}")

    took_part = sorted(collector.results)
    finished = collector.aggregate is not None
    out = SecureOutcome(ok=False, shares=shares, threshold=threshold,
                        dropped=[{"site": site(n), "node_id": n,
                                  "error": pgrid.errors.get(n, "left the secure aggregation protocol")}
                                 for n in nodes if n in pgrid.errors or (finished and n not in collector.results)])
    out.sites = [{"site": site(n), "node_id": n, "num_examples": min(collector.results[n][0], examples_per_update),
                  "bytes_up": pgrid.up.get(n, 0), "bytes_down": pgrid.down.get(n, 0),
                  "metrics": {k: v for k, v in collector.results[n][1].items() if k in SITE_METRICS}}
                 for n in took_part]
    agg = collector.aggregate
    if agg is None or len(agg) != len(floats) + 1:
        out.error = (f"secure aggregation did not complete ({len(nodes) - len(out.dropped)} of {len(nodes)} sites "
                     f"finished the protocol; each site needs {threshold} of its {shares} share holders)"
                     if agg is None else f"the aggregate has {len(agg)} arrays, expected {len(floats) + 1}")
        out.seconds = time.monotonic() - t0
        return arrays, out
    deltas = dict(zip(floats, agg[:-1]))
    norm = math.hypot(*(float(np.linalg.norm(d)) for d in deltas.values()))
    n_coords = sum(d.size for d in deltas.values())
    # a weighted mean of updates clipped to the bound is within it; plus the encoding's rounding
    slack = settings.step * math.sqrt(n_coords) * 4 + 1e-6 * settings.update_norm_bound
    out.aggregate_norm = norm
    if not all(np.isfinite(d).all() for d in agg) or not norm <= settings.update_norm_bound + slack:
        out.error = (f"the securely aggregated update has norm {norm:.4g}, above the agreed bound "
                     f"{settings.update_norm_bound:g} (fl.secagg.update_norm_bound): a site did not clip its update; "
                     "the round is not applied")
        out.seconds = time.monotonic() - t0
        return arrays, out
    out.ok, out.loss = True, decode_loss(float(agg[-1][0]), settings.update_norm_bound)
    new = ArrayRecord({k: Array((global_[k].astype(np.float32) + deltas[k].astype(np.float32)).astype(np.float32))
                       if k in deltas else arrays[k] for k in keys})
    total = sum(s["num_examples"] for s in out.sites)
    reply = Message(RecordDict({"arrays": new, "metrics": MetricRecord({"num-examples": total, "loss": out.loss})}),
                    reply_to=msgs[0])
    agg_arrays, _ = strategy.aggregate_train(local_round, [reply])  # FedAdam: its server step
    out.seconds = time.monotonic() - t0
    return (agg_arrays if agg_arrays is not None else new), out


def run_secure_rounds(wgrid, strategy, settings: SecAggSettings, strategy_name: str, arrays: ArrayRecord,
                      num_rounds: int, timeout: float | None, train_config: ConfigRecord, examples_per_update: int,
                      on_round_end: Callable[[int, ArrayRecord, SecureOutcome | None], None]) -> ArrayRecord:
    """Flower's Strategy.start loop with each round through `secure_round`; a round that fails is
    logged in one line and the run goes on to the next with the weights unchanged."""
    on_round_end(0, arrays, None)
    for local_round in range(1, num_rounds + 1):
        arrays, outcome = secure_round(wgrid, strategy, settings, strategy_name, local_round, arrays, train_config,
                                       timeout, examples_per_update)
        if not outcome.ok:
            rnd = local_round + int(getattr(strategy, "round_offset", 0))
            log(WARNING, f"[mrsfm] round {rnd}: {outcome.error}; the global model is unchanged, "
                         "the run goes on to the next round")
        on_round_end(local_round, arrays, outcome)
    return arrays
