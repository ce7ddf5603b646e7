"""Flower's strategies with what a multi-hospital run needs: a bounded wait for sites before each
round, a global round number that survives a restart (resume), and rounds whose sites report
different metrics (a DP site reports epsilon, the others do not).

fedavg, fedprox and fedadam average (FedAdam: then take an Adam step on the server); fedmedian
and fedtrimmedavg are Flower's robust aggregators (coordinate-wise median, trimmed mean), which
one site's runaway weights cannot drag far. Both are unweighted (num-examples is ignored) and
keep float32 (numpy's median and mean of float32 stay float32). Updates that are broken outright
(NaN, wrong shapes, norm outliers) never reach any of them: server/validate.py rejects those."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

from mrsfm_model.model.weights import read_tensors, write_tensors


class _Nodes:
    """A frozen view of the connected nodes: Flower's node sampling then never blocks."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


class Federated:
    """Mixin for FedAvg-family strategies. `grid` is a server.transport.WireGrid."""

    round_offset = 0  # rounds completed before this start (resume)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        nodes = grid.wait_for_sites()  # bounded; raises SitesMissingError
        return super().configure_train(server_round + self.round_offset, arrays, config, _Nodes(nodes))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, metrics = super().aggregate_train(server_round + self.round_offset, replies)
        if arrays is not None and any(a.dtype == "float64" for a in arrays.values()):  # FedAdam's numpy math
            arrays = ArrayRecord({k: Array(a.numpy().astype(np.float32)) if a.dtype == "float64" else a
                                  for k, a in arrays.items()})
        return arrays, metrics

    def _check_and_log_replies(self, replies: Iterable[Message], is_train: bool, validate: bool = True):
        """Flower's reply check without its consistency test: WireGrid has checked every reply
        (server/validate.py), and Flower's test fails the whole round when the sites' metrics
        differ in keys, as they do when one site trains with DP (epsilon, ...) and another not."""
        return super()._check_and_log_replies(replies, is_train, validate=False)

    def save_state(self, path: Path) -> Path | None:
        """Server optimizer state (none for FedAvg/FedProx)."""
        return None

    def load_state(self, path: Path) -> None:
        pass


# name -> (strategy class, its settings from configs/fl/<name>.yaml): filled by `_register` beside
# each class, so a strategy is named once
_REGISTRY: dict[str, tuple[type[Federated], Callable[[Any], dict[str, float]]]] = {}


def _register(name: str, settings: Callable[[Any], dict[str, float]] = lambda fl_cfg: {}):
    def add(cls: type[Federated]) -> type[Federated]:
        _REGISTRY[name] = (cls, settings)
        return cls

    return add


@_register("fedavg")
class FedAvgFL(Federated, FedAvg):
    pass


@_register("fedprox", lambda c: {"proximal_mu": float(c.proximal_mu)})
class FedProxFL(Federated, FedProx):
    pass


@_register("fedadam", lambda c: {"eta": float(c.eta), "beta_1": float(c.beta_1), "beta_2": float(c.beta_2),
                                 "tau": float(c.tau)})
class FedAdamFL(Federated, FedAdam):
    """FedAdam whose moments are saved beside the round checkpoint (Flower does not save them)."""

    def save_state(self, path: Path) -> Path | None:
        if not self.m_t or not self.v_t:
            return None
        tensors = {f"m.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.m_t.items()}
        tensors.update({f"v.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.v_t.items()})
        return write_tensors(tensors, path)

    def load_state(self, path: Path) -> None:
        if not path.is_file():
            return
        state = read_tensors(path)
        self.m_t = {k[2:]: v.numpy() for k, v in state.items() if k.startswith("m.")}
        self.v_t = {k[2:]: v.numpy() for k, v in state.items() if k.startswith("v.")}


@_register("fedmedian")
class FedMedianFL(Federated, FedMedian):
    pass


@_register("fedtrimmedavg", lambda c: {"beta": float(c.beta)})
class FedTrimmedAvgFL(Federated, FedTrimmedAvg):
    pass


STRATEGIES = tuple(_REGISTRY)


def make_strategy(name: str, fl_cfg, min_sites: int) -> Federated:
    """Strategy `name` with settings from configs/fl/<name>.yaml; never a client-side evaluate round."""
    if name not in _REGISTRY:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    cls, settings = _REGISTRY[name]
    return cls(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_sites, min_available_nodes=min_sites,
               train_metrics_aggr_fn=_mean_numeric_metrics, **settings(fl_cfg))


def _mean_numeric_metrics(records, weight_key: str) -> MetricRecord:
    """num-examples-weighted mean of the reply metrics (Flower's default, minus non-metric keys),
    each over the sites that report it (only DP sites report epsilon)."""
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for r in records:
        metrics = next(iter(r.metric_records.values()))
        w = float(metrics[weight_key])
        for k, v in metrics.items():
            if k != weight_key and isinstance(v, (int, float)):
                sums[k] = sums.get(k, 0.0) + float(v) * w
                totals[k] = totals.get(k, 0.0) + w
    return MetricRecord({k: v / (totals[k] or 1.0) for k, v in sums.items()})
