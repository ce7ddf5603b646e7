"""A site's side of secure aggregation (fl.secure_aggregation=true): Flower's SecAgg+ client mod,
and the checks the coordinator can no longer make once it sees only the sum of the sites' updates.

The protocol itself is Flower's (`flwr.client.mod.secaggplus_mod`): keys, secret shares, masks
and the integer encoding are its code, not ours. `secure_mod` hands it the messages of that
protocol (they carry its config record) and every other message (plain rounds, queries) straight
to the handler. In the protocol's training stage the mod calls the ClientApp's train handler,
which answers through `secure_reply`: the site trains as in a plain round, then, before anything
is masked,
  - refuses a non-finite update or loss (the round goes on without this site, through SecAgg+'s
    dropout recovery; nothing of the broken update leaves the site),
  - clips ||w_site - w_global|| (L2 over the float weights) to the agreed bound
    (fl.secagg.update_norm_bound), which also keeps every coordinate inside the encoding's range,
  - caps its num-examples at what the server asked for (local steps x batch size), as the server
    caps it in plain mode,
and sends the update (w_site - w_global, not the weights: the bound is about the update, and the
encoding's step is finer for the small values) plus its loss, both inside the masked vector, so
the coordinator learns only the weighted mean loss. In the clear it sees only counts, timings and
the site's DP accounting (`SITE_METRICS`), none of which is computed from the site's spectra.

The encoding both ends share (the loss coordinate, which metrics travel in the clear) is in
mrsfm_model/model/wire.py; the update checks the coordinator makes in plain rounds in
mrsfm_model/model/updates.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from mrsfm_model.model.updates import nonfinite_problem, update_norm
from mrsfm_model.model.wire import SITE_METRICS, encode_loss, float_keys

FITINS_CONFIG, FITINS_PARAMETERS = "fitins.config", "fitins.parameters"  # Flower's legacy names (compat)
# What a site's secure-mode reply carries in the clear: counts, timings, DP accounting (functions of
# the privacy settings and step counts, not of the spectra). Never the loss.


class UpdateRefused(ValueError):
    """The site will not send this update (non-finite values): one line, names the tensor."""


def secure_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's secaggplus_mod for the messages of the SecAgg+ protocol, a no-op for the others."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, call_next)


def is_secure_round(content: RecordDict) -> bool:
    """A train message of the SecAgg+ protocol's training stage (Flower's legacy FitIns layout)."""
    return FITINS_CONFIG in content.config_records


def site_metrics(metrics: Mapping) -> dict[str, float]:
    """The metrics a site reports in the clear in secure mode (`SITE_METRICS`), numbers only."""
    return {k: float(v) for k, v in metrics.items() if k in SITE_METRICS and isinstance(v, (int, float, bool))}


def clipped_update(state: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray], keys: Sequence[str],
                   bound: float) -> tuple[list[np.ndarray], float]:
    """(w_site - w_global per key, float32, clipped to L2 norm `bound`; the norm before clipping),
    finiteness and norm checked as the coordinator checks them in plain rounds (model/updates.py).
    UpdateRefused for NaN/Inf in the weights: such an update must never be masked and sent."""
    site = {k: torch.from_numpy(np.asarray(state[k], dtype=np.float32)) for k in keys}
    if why := nonfinite_problem(site):
        raise UpdateRefused(f"{why}: this site's update is not sent (secure aggregation: the coordinator "
                            "could not reject it)")
    norm = update_norm(site, {k: torch.from_numpy(np.asarray(global_[k], dtype=np.float32)) for k in keys})
    if not math.isfinite(norm):
        raise UpdateRefused(f"update norm {norm} is not finite: this site's update is not sent")
    deltas = [site[k].numpy() - np.asarray(global_[k], dtype=np.float32) for k in keys]
    if norm > bound:
        scale = np.float32(bound / norm)
        deltas = [d * scale for d in deltas]
    return deltas, norm


def secure_reply(msg: Message, context: Context, node: Mapping[str, str],
                 local_round: Callable, log: Callable[[str], None]) -> Message:
    """The train handler's answer in the protocol's training stage: `local_round(conf, node,
    global_weights)` as in a plain round (client/app.py), then the site's checks (module docstring),
    as the FitRes that Flower's mod masks. Raises UpdateRefused (an error reply) for a broken update."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    conf = dict(msg.content.config_records[FITINS_CONFIG])
    keys = str(conf.pop("secure-keys")).split(",")
    bound, cap = float(conf.pop("update-norm-bound")), int(conf.pop("max-examples"))
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(msg.content.array_records[FITINS_PARAMETERS],
                                                                     keep_input=False))
    if len(arrays) != len(keys):
        raise ValueError(f"secure round: {len(arrays)} arrays for {len(keys)} keys")
    global_ = dict(zip(keys, arrays))

    def global_weights(template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if list(template) != keys:
            missing, extra = set(template) - set(keys), set(keys) - set(template)
            raise ValueError(f"secure round: the server's weights are not this site's model (missing {len(missing)}, "
                             f"unexpected {len(extra)} keys; same model= on every site?)")
        return {k: torch.from_numpy(np.array(global_[k])).to(template[k].dtype) for k in keys}

    state, metrics = local_round(conf, node, global_weights)
    site = node["site"]
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise UpdateRefused(f"non-finite loss ({loss}): this site's update is not sent")
    floats = float_keys(keys, global_)
    deltas, norm = clipped_update({k: state[k].detach().cpu().float().numpy() for k in floats}, global_, floats, bound)
    if norm > bound:  # the site's own log: the coordinator never learns this site's norm
        log(f"[mrsfm] {site}: update norm {norm:.4g} clipped to the agreed bound {bound:g} "
            "(fl.secagg.update_norm_bound) before secure aggregation")
    claimed = int(metrics["num-examples"])
    n = max(1, min(claimed, cap))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([*deltas, np.array([encode_loss(loss, bound)])]), n,
                    site_metrics({**metrics, "num-examples": n}))
    content = compat.fitres_to_recorddict(fitres, keep_input=False)
    content["site"] = ConfigRecord({"site": site})
    return Message(content, reply_to=msg)
