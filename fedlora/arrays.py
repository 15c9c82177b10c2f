"""Adapter state <-> Flower ArrayRecord, and what a message weighs on the wire."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

State = dict[str, np.ndarray]


def to_record(state: State) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    return {k: v.numpy() for k, v in record.items()}


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's records as serialized for sending."""
    return sum(record.count_bytes() for record in content.values())


def check_update(delta: State, reference: State, max_norm: float = 1e6) -> str | None:
    """Why an update cannot be aggregated (wrong keys, shapes, non-finite, absurd), or None."""
    if delta.keys() != reference.keys():
        missing, extra = reference.keys() - delta.keys(), delta.keys() - reference.keys()
        return f"wrong tensors: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
    sq = 0.0
    for k, v in delta.items():
        if v.shape != reference[k].shape:
            return f"tensor {k}: shape {v.shape} != {reference[k].shape}"
        if not np.all(np.isfinite(v)):
            return f"tensor {k}: contains NaN or Inf"
        sq += float(np.sum(np.square(v, dtype=np.float64)))
    if sq ** 0.5 > max_norm:
        return f"update norm {sq ** 0.5:.3g} exceeds the bound {max_norm:.3g}"
    return None
