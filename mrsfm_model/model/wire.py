"""Model weights on the wire: 16-bit by default, averaged in float32 on arrival.

Flower's ArrayRecord refuses bf16 tensors, so a bf16 weight travels as its raw 16 bits viewed
as int16; the receiver knows from its own model which entries are floating point and turns
those back into float32 (bf16 -> fp32 is exact). Half the bytes of fp32, and the server's
averaging never sees the 16-bit views. Both ends use this module: the ClientApp and the
server's `WireGrid` (the transport layer between the strategy and Flower's Grid).

`pack` / `unpack` then put a whole ArrayRecord into two arrays for the trip through Flower: its
object store moves every Array (and each of its chunks) as an HTTP request of its own, signed and
verified, at every hop (ServerApp, SuperLink, SuperNode, site worker), so a model's ~50-250 tensors
were ~1 000-5 000 requests per round, and on 2 cores that work, not training, set a micro round's
length. Packing keeps every byte: what `unpack` returns is the very record that was packed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

WIRE_DTYPES = ("bf16", "fp32")
PACKED, LAYOUT = "packed", "packed.layout"  # the two arrays of a packed record: bytes, and what they hold


def encode(state: Mapping[str, torch.Tensor], wire_dtype: str = "bf16") -> ArrayRecord:
    """state_dict -> ArrayRecord; floating tensors as bf16 bits (int16 view) or float32."""
    return ArrayRecord({key: Array(t.numpy()) for key, t in _wire_tensors(state, wire_dtype)})


def _wire_tensors(state: Mapping[str, torch.Tensor], wire_dtype: str):
    """(key, tensor as it travels): floating tensors as bf16 bits (int16) or float32, on the CPU."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire-dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
    for key, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.is_floating_point():
            t = t.to(torch.bfloat16).view(torch.int16) if wire_dtype == "bf16" else t.float()
        yield key, t


def decode(record: ArrayRecord, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ArrayRecord -> float32 state_dict, using `template` (the receiver's model) to know
    which int16 arrays are bf16 bits. Keys or shapes that differ from the template fail loudly."""
    _keys_problem(record.keys(), template)
    return {key: _from_wire(key, record[key].numpy(), ref) for key, ref in template.items()}


def _from_wire(key: str, arr: np.ndarray, ref: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """One array as it travelled -> the model's tensor (float32 for floating-point entries).
    `copy`: never a view of `arr` (a view into packed bytes would be unaligned and keep them alive)."""
    if ref.is_floating_point() and arr.dtype == np.int16:
        t = torch.from_numpy(arr).view(torch.bfloat16).float()
    elif ref.is_floating_point():
        t = torch.from_numpy(arr).to(torch.float32, copy=copy)
    else:
        t = torch.from_numpy(arr).to(ref.dtype, copy=copy)
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"weights do not match the model: {key} has shape {tuple(t.shape)}, "
                         f"the model {tuple(ref.shape)} (same model= override on every site?)")
    return t


def _keys_problem(keys, template: Mapping[str, torch.Tensor]) -> None:
    if set(keys) != set(template.keys()):
        missing, extra = set(template) - set(keys), set(keys) - set(template)
        raise ValueError(f"weights do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]}")


def nbytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord as serialised (what crosses the network)."""
    return sum(len(a.data) for a in record.values())


def as_fp32_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """float32 ArrayRecord (what the strategies aggregate and keep between rounds)."""
    return encode(state, "fp32")


def to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord of plain arrays -> tensors (for fp32 records held by the server)."""
    return {k: torch.from_numpy(a.numpy()) for k, a in record.items()}


def pack(record: ArrayRecord) -> ArrayRecord:
    """Every array's bytes in one uint8 array, in the record's order, and its layout (names, dtypes,
    shapes) as JSON in a second one."""
    return _packed([(k, a.numpy()) for k, a in record.items()])


def pack_state(state: Mapping[str, torch.Tensor], wire_dtype: str = "bf16") -> ArrayRecord:
    """pack(encode(state, wire_dtype)), byte for byte, without the per-tensor Arrays in between
    (each of those is a copy; on a ViT-B this halves the time, 0.58 -> 0.32 s)."""
    return _packed([(k, t.numpy()) for k, t in _wire_tensors(state, wire_dtype)])


def _packed(arrays: list[tuple[str, np.ndarray]]) -> ArrayRecord:
    layout = [[k, a.dtype.str, list(a.shape)] for k, a in arrays]
    data = np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8) for _, a in arrays]) if arrays \
        else np.zeros(0, np.uint8)
    return ArrayRecord({PACKED: Array(data), LAYOUT: Array(np.frombuffer(json.dumps(layout).encode(), np.uint8))})


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The record `pack` was given. A record that is not packed is returned as it is (validation
    judges it like any other); a packed one whose layout and bytes disagree raises ValueError."""
    if set(record.keys()) != {PACKED, LAYOUT}:
        return record
    return ArrayRecord({key: Array(arr) for key, arr in _unpacked(record)})


def unpack_state(record: ArrayRecord, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """decode(unpack(record), template) without the per-tensor Arrays in between (a ViT-B: 0.25 ->
    0.10 s). Raises ValueError as those do, for a bad packing or weights of another model."""
    if set(record.keys()) != {PACKED, LAYOUT}:
        return decode(record, template)
    arrays = dict(_unpacked(record))
    _keys_problem(arrays.keys(), template)
    return {key: _from_wire(key, arrays[key], ref, copy=True) for key, ref in template.items()}


def _unpacked(record: ArrayRecord) -> list[tuple[str, np.ndarray]]:
    """(key, array) views into a packed record's bytes, in its layout's order."""
    try:
        layout = json.loads(record[LAYOUT].numpy().tobytes())
        data = record[PACKED].numpy()
        out, offset = [], 0
        for key, dtype, shape in layout:
            dt = np.dtype(dtype)
            n = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            if data.dtype != np.uint8 or offset + n > data.size:
                raise ValueError("the packed bytes end before the layout does")
            out.append((str(key), data[offset:offset + n].view(dt).reshape(shape)))
            offset += n
    except (TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"a packed record that cannot be unpacked: {exc}") from exc
    if offset != data.size:
        raise ValueError(f"a packed record with {data.size - offset} bytes beyond its layout")
    return out


# --------------------------------------------------------------------------- secure aggregation's encoding
# Shared by the site (client/secure.py) and the coordinator (server/secure.py) in secure mode.
# The metrics a site may report in the clear: counts, timings and its DP accounting, none computed
# from its spectra.
SITE_METRICS = ("num-examples", "local-seconds", "setup-seconds", "build-seconds", "simulation-only",
                "epsilon", "delta", "private-steps", "noise-multiplier", "budget-spent", "unprotected-rounds")
# The loss travels masked as one more coordinate, scaled into the encoding's range [-bound, bound]:
# losses in [0, LOSS_CAP] keep a step of LOSS_CAP x 2 / quantization_range (4.8e-5 by default; a micro
# model starts near 15).
LOSS_CAP = 100.0


def encode_loss(loss: float, bound: float) -> float:
    return min(max(float(loss), 0.0), LOSS_CAP) * bound / LOSS_CAP


def decode_loss(value: float, bound: float) -> float:
    return float(value) * LOSS_CAP / bound


def float_keys(keys: Sequence[str], arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The entries that are averaged (floating point weights); integer buffers keep the global value."""
    return [k for k in keys if np.issubdtype(arrays[k].dtype, np.floating)]
