"""Server-side checks on every site's update before it is aggregated.

One broken site must not spoil the global model of all the others: a single NaN spreads through
FedAvg's mean into every weight of every site in one round; weights of another model (a
different `model=` override) cannot be averaged at all and would crash the round; and a site
whose optimizer diverged, or that trained with a wrong learning rate, drags the mean with it.
So `WireGrid` asks `UpdateValidator` about each round's replies before the strategy sees them:
a reply with a reason is left out (logged with its site, listed under "dropped" in
metrics.jsonl) and the round aggregates the others.

Checks (configs/validation): the array records and model keys that were sent, shapes and wire
dtypes, the metrics the server logs, finite values, and the update's norm
||w_site - w_global|| against the median of the other sites' norms. With `enabled: false` only
what decoding needs (records, keys, shapes, metrics) is checked: a reply that cannot be decoded
is still rejected, never a crash of the round.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from flwr.app import ArrayRecord, RecordDict

from mrsfm_model.config import ConfigSection
from mrsfm_model.logs import Log, get_logger
from mrsfm_model.model.updates import nonfinite_problem, update_norm
from mrsfm_model.model.wire import decode, to_state

_log = get_logger("server")

K = TypeVar("K", bound=Hashable)
REQUIRED_METRICS = ("loss",)  # metrics.jsonl logs it; the aggregation weight is the server's (transport.py)
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ValidationSettings(ConfigSection):
    """Update checks; values (and their reasons) in configs/validation/default.yaml."""

    SECTION = "validation"
    enabled: bool
    max_norm_ratio: float
    clip_norm_ratio: float
    min_cosine: float

    def check(self) -> None:
        if not self.max_norm_ratio > 1:
            raise ValueError(f"validation.max_norm_ratio must be > 1 (a multiple of the other sites' median "
                             f"update norm), got {self.max_norm_ratio}")
        if not self.clip_norm_ratio >= 1:
            raise ValueError(f"validation.clip_norm_ratio must be >= 1, got {self.clip_norm_ratio}")
        if not -1 <= self.min_cosine <= 1:
            raise ValueError(f"validation.min_cosine must be in [-1, 1], got {self.min_cosine}")

    @classmethod
    def of(cls, cfg: ValidationSettings | Mapping | None) -> ValidationSettings:
        """From the composed config's `validation` group (a DictConfig or dict); None: the defaults."""
        return cfg if isinstance(cfg, cls) else cls.from_config(cfg)


def wire_dtype_of(ref: torch.Tensor, wire_dtype: str) -> str:
    """The numpy dtype a site sends for a model entry: floats as bf16 bits (int16) or float32,
    anything else (int buffers) as itself."""
    if ref.is_floating_point():
        return "int16" if wire_dtype == "bf16" else "float32"
    return str(torch.empty(0, dtype=ref.dtype).numpy().dtype)


def _few(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def array_problem(record: ArrayRecord, template: Mapping[str, torch.Tensor], wire_dtype: str,
                  dtypes: bool = True) -> str | None:
    """Why `record` is not this model's weights as sent on the wire (keys, shapes and, with
    `dtypes`, dtypes), or None. Reads only the arrays' headers, never their data."""
    missing, extra = set(template) - set(record), set(record) - set(template)
    if missing or extra:
        return "keys do not match the model: " + "; ".join(
            [f"missing {_few(missing)}"] * bool(missing) + [f"unexpected {_few(extra)}"] * bool(extra))
    for key, ref in template.items():
        arr = record[key]
        if tuple(arr.shape) != tuple(ref.shape):
            return f"{key} has shape {tuple(arr.shape)}, the model {tuple(ref.shape)} (same model= on every site?)"
        if dtypes and arr.dtype != (want := wire_dtype_of(ref, wire_dtype)):
            why = ("as in the model" if not ref.is_floating_point() else
                   "bf16 bits, bf16 on the wire" if wire_dtype == "bf16" else f"{wire_dtype} on the wire")
            return f"{key} has dtype {arr.dtype}, expected {want} ({why})"
    return None


def reply_problem(content: RecordDict, sent_keys: Iterable[str], template: Mapping[str, torch.Tensor],
                  wire_dtype: str, dtypes: bool = True) -> str | None:
    """Why a reply cannot be aggregated at all: not the array records that were sent, or not
    this model's weights (`array_problem`), or no MetricRecord with the metrics the server needs
    (Flower's aggregation and the metrics line would raise on those, failing the whole round)."""
    got, want = sorted(content.array_records), sorted(sent_keys)
    if got != want:
        return f"array records {got}, expected {want}"
    metrics = list(content.metric_records.values())
    if len(metrics) != 1:
        return f"{len(metrics)} MetricRecords, expected one"
    if bad := [k for k in REQUIRED_METRICS if not isinstance(metrics[0].get(k), (int, float))]:
        return f"no numeric {', '.join(bad)} in its metrics"
    return next((why for key in want if (why := array_problem(content[key], template, wire_dtype, dtypes))), None)


def values_problem(states: Mapping[str, State], metrics: Mapping) -> str | None:
    """NaN/Inf in any decoded array record (`nonfinite_problem`) or in the reported loss, or None."""
    why = next((w for state in states.values() if (w := nonfinite_problem(state))), None)
    loss = float(metrics["loss"])
    return why or (None if math.isfinite(loss) else f"non-finite loss ({loss})")


def norm_outliers(norms: Mapping[K, float], max_ratio: float) -> dict[K, str]:
    """Sites whose update norm exceeds `max_ratio` x the median of the OTHER sites' norms.

    The median of the others, not of all: one huge update then cannot raise its own yardstick,
    and with three sites a good site is judged against a good one and the outlier (their mean,
    larger than the good norm) while the outlier is judged against the two good ones. Needs at
    least 2 other sites (fewer: no judgement, returns {}), and others that moved at all (a zero
    median, e.g. sites that only slept in a benchmark, gives no yardstick). Only too-large updates
    are outliers: a site that barely moved is no threat to the mean."""
    if len(norms) < 3:
        return {}
    out = {}
    for k, norm in norms.items():
        med = statistics.median(v for j, v in norms.items() if j != k)
        if med > 0 and not norm <= max_ratio * med:  # `not <=`: a NaN norm is an outlier too
            ratio = norm / med
            size = f"{ratio:.3g}x" if ratio < 1e3 else f"{ratio:.0f}x" if math.isfinite(ratio) else "beyond float32,"
            out[k] = (f"update norm {norm:.3g} is {size} the median of the other sites ({med:.3g}); "
                      f"validation.max_norm_ratio is {max_ratio:g}")
    return out


def lower_median(rows: torch.Tensor) -> torch.Tensor:
    """torch.median(rows, dim=0) (the lower median), 5-15x faster for the few sites of a round:
    an odd-even transposition sort of the rows, element-wise min/max only (n passes of n/2
    compare-exchanges, so from ~24 rows on torch's own median is the faster)."""
    n = rows.shape[0]
    if n > 24:
        return rows.median(dim=0).values
    r = list(rows.unbind(0))
    for p in range(n):
        for i in range(p % 2, n - 1, 2):
            r[i], r[i + 1] = torch.minimum(r[i], r[i + 1]), torch.maximum(r[i], r[i + 1])
    return r[(n - 1) // 2]


class UpdateValidator:
    """One round's replies in, the decoded float32 updates that may be aggregated out, with a
    one-line reason for every reply that may not. See the module docstring for the checks."""

    def __init__(self, template: Mapping[str, torch.Tensor], wire_dtype: str,
                 settings: ValidationSettings | Mapping | None = None, say: Log = _log.info):
        self.template, self.wire_dtype, self.settings = template, wire_dtype, ValidationSettings.of(settings)
        self.say = say
        self._said_few = False  # the "too few sites to judge norms" note, once per run
        self.accepted_norms: list[float] = []  # norms of accepted updates, recent rounds (the clip's yardstick)

    def __call__(self, replies: Mapping[K, RecordDict], sent: Mapping[K, Mapping[str, ArrayRecord]]
                 ) -> tuple[dict[K, dict[str, State]], dict[K, str]]:
        """`replies`: each site's reply content; `sent`: the array records sent to it (the global
        weights, float32). Returns ({site: {record key: float32 state}}, {site: reason})."""
        on = self.settings.enabled
        decoded: dict[K, dict[str, State]] = {}
        reasons: dict[K, str] = {}
        for k, content in replies.items():
            why = reply_problem(content, sent[k], self.template, self.wire_dtype, dtypes=on)
            if why is None:
                try:
                    decoded[k] = {key: decode(content[key], self.template) for key in sent[k]}
                except ValueError as exc:  # reply_problem should have said why; never fail the round
                    why = str(exc)
            if why is None and on:
                why = values_problem(decoded[k], next(iter(content.metric_records.values())))
            if why:
                reasons[k] = why
                decoded.pop(k, None)
        if on and decoded:
            # the global weights each site was sent (usually one record, sent to all), decoded once
            globals_ = {id(rec): to_state(rec) for k in decoded for rec in sent[k].values()}
            norms = {k: math.hypot(*(update_norm(s, globals_[id(sent[k][key])]) for key, s in states.items()))
                     for k, states in decoded.items()}
            def reject(found: Mapping[K, str]) -> None:
                for k, why in found.items():
                    reasons[k] = why
                    del decoded[k], norms[k]

            reject(self._norm_outliers(norms))
            if len(decoded) >= 3:  # the direction check over the updates the norm check kept
                reject(self._against_the_others(decoded, sent, globals_))
            if decoded:
                self._clip(decoded, sent, globals_, norms)
        return decoded, reasons

    def _against_the_others(self, decoded: Mapping[K, dict[str, State]], sent, globals_: Mapping[int, State]
                            ) -> dict[K, str]:
        """Updates whose direction disagrees with the coordinate-wise median of all updates (the
        consensus a majority of honest sites sets, which a sign-flipped or a colluding minority
        cannot move): cosine below validation.min_cosine."""
        sites = list(decoded)
        tensors = [(key, name) for key, s in decoded[sites[0]].items() for name, t in s.items() if t.is_floating_point()]
        dot = torch.zeros(len(sites), dtype=torch.float64)
        norm2 = torch.zeros(len(sites), dtype=torch.float64)
        med2 = 0.0
        for key, name in tensors:  # tensor by tensor: memory of one tensor x the sites
            # float32 per tensor, sums combined in double: a cosine threshold needs no more (in
            # double with torch.median this check took ~9 s a round on a ViT-B with 3 sites)
            stack = torch.stack([(decoded[k][key][name].float() - globals_[id(sent[k][key])][name].float()).flatten()
                                 for k in sites])
            med = lower_median(stack)
            med2 += float(med @ med)
            dot += (stack @ med).double()
            norm2 += stack.square().sum(dim=1).double()
        dot, norm2 = dict(zip(sites, dot.tolist())), dict(zip(sites, norm2.tolist()))
        out = {}
        for k in sites:
            if med2 > 0 and norm2[k] > 0:
                cos = dot[k] / math.sqrt(norm2[k] * med2)
                if not cos >= self.settings.min_cosine:  # `not >=`: a NaN cosine (float32 overflow) fails too
                    out[k] = (f"update points against the others (cosine {cos:.2f} with the median of all "
                              f"updates); validation.min_cosine is {self.settings.min_cosine:g}")
        return out

    def _clip(self, decoded: Mapping[K, dict[str, State]], sent, globals_: Mapping[int, State],
              norms: dict[K, float]) -> None:
        """Bound every accepted update to clip_norm_ratio x the running median of accepted norms (this
        round's included), so a site that scales its update, round after round, still moves the
        model no more than that; the clipped update keeps its direction."""
        yardstick = self.accepted_norms[-50:] + list(norms.values())
        if len(yardstick) < 3:
            self.accepted_norms += list(norms.values())
            return
        bound = self.settings.clip_norm_ratio * statistics.median(yardstick)
        for k, norm in norms.items():
            if norm > bound > 0:
                scale = bound / norm
                for key, state in decoded[k].items():
                    ref = globals_[id(sent[k][key])]
                    for name, t in state.items():
                        if t.is_floating_point():
                            g = ref[name].float()
                            state[name] = g + (t.float() - g) * scale
                self.say(f"update validation: clipped an update of norm {norm:.3g} to {bound:.3g} "
                         f"(validation.clip_norm_ratio {self.settings.clip_norm_ratio:g} x the median of accepted norms)")
                norms[k] = bound
        self.accepted_norms += list(norms.values())

    def _norm_outliers(self, norms: Mapping[K, float]) -> dict[K, str]:
        if len(norms) < 3:
            if not self._said_few:
                self.say(f"update validation: {len(norms)} site update(s) in this round, too few to judge "
                         "update norms (each needs at least 2 other sites to compare with); key, shape, dtype "
                         "and NaN/Inf checks still apply")
                self._said_few = True
            return {}
        return norm_outliers(norms, self.settings.max_norm_ratio)
