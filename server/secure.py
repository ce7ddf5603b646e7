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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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
