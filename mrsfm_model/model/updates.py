"""A site's model update, checked the same way wherever it is checked: by the coordinator in plain
rounds (server/validate.py) and, in secure rounds, by the site itself before masking
(client/secure.py), where the coordinator can no longer see it."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def nonfinite_problem(state: Mapping[str, torch.Tensor]) -> str | None:
    """'non-finite values in KEY (12 NaN, 1 Inf)' for the first tensor with NaN or Inf, or None."""
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if not bad:
        return None
    t = state[bad[0]]
    counts = ", ".join(f"{n} {what}" for n, what in ((int(t.isnan().sum()), "NaN"), (int(t.isinf().sum()), "Inf"))
                       if n)
    more = f" and {len(bad) - 1} other tensor(s)" if len(bad) > 1 else ""
    return f"non-finite values in {bad[0]} ({counts}){more}"


def update_norm(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """||w_site - w_global|| in float32 over the floating-point tensors (int buffers are counts,
    not weights). Per-tensor norms are combined in double, so only a tensor whose own norm
    overflows float32 gives inf."""
    return math.hypot(*(float(torch.linalg.vector_norm(t.float() - reference[k].float()))
                        for k, t in state.items() if t.is_floating_point()))
