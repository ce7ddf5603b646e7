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
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

WIRE_DTYPES = ("bf16", "fp32")
PACKED, LAYOUT = "packed", "packed.layout"  # the two arrays of a packed record: bytes, and what they hold


def encode(state: Mapping[str, torch.Tensor], wire_dtype: str = "bf16") -> ArrayRecord:
    """state_dict -> ArrayRecord; floating tensors as bf16 bits (int16 view) or float32."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire-dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
    arrays = {}
    for key, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.is_floating_point():
            t = t.to(torch.bfloat16).view(torch.int16) if wire_dtype == "bf16" else t.float()
        arrays[key] = Array(t.numpy())
    return ArrayRecord(arrays)


def decode(record: ArrayRecord, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ArrayRecord -> float32 state_dict, using `template` (the receiver's model) to know
    which int16 arrays are bf16 bits. Keys or shapes that differ from the template fail loudly."""
    if set(record.keys()) != set(template.keys()):
        missing, extra = set(template) - set(record), set(record) - set(template)
        raise ValueError(f"weights do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]}")
    out = {}
    for key, ref in template.items():
        arr = record[key].numpy()
        if ref.is_floating_point() and arr.dtype == np.int16:
            t = torch.from_numpy(arr).view(torch.bfloat16).float()
        elif ref.is_floating_point():
            t = torch.from_numpy(arr).float()
        else:
            t = torch.from_numpy(arr).to(ref.dtype)
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"weights do not match the model: {key} has shape {tuple(t.shape)}, "
                             f"the model {tuple(ref.shape)} (same model= override on every site?)")
        out[key] = t
    return out


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
    arrays = [(k, a.numpy()) for k, a in record.items()]
    layout = [[k, a.dtype.str, list(a.shape)] for k, a in arrays]
    data = np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8) for _, a in arrays]) if arrays \
        else np.zeros(0, np.uint8)
    return ArrayRecord({PACKED: Array(data), LAYOUT: Array(np.frombuffer(json.dumps(layout).encode(), np.uint8))})


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The record `pack` was given. A record that is not packed is returned as it is (validation
    judges it like any other); a packed one whose layout and bytes disagree raises ValueError."""
    if set(record.keys()) != {PACKED, LAYOUT}:
        return record
    try:
        layout = json.loads(record[LAYOUT].numpy().tobytes())
        data = record[PACKED].numpy()
        out, offset = {}, 0
        for key, dtype, shape in layout:
            dt = np.dtype(dtype)
            n = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            if data.dtype != np.uint8 or offset + n > data.size:
                raise ValueError("the packed bytes end before the layout does")
            out[str(key)] = Array(data[offset:offset + n].view(dt).reshape(shape))
            offset += n
    except (TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"a packed record that cannot be unpacked: {exc}") from exc
    if offset != data.size:
        raise ValueError(f"a packed record with {data.size - offset} bytes beyond its layout")
    return ArrayRecord(out)
