"""Compression of the update a site uploads, and its decoding at the coordinator.

Pure numpy: `encode` turns a site's update (tensor name -> float32 array) into a
flat dict of numpy arrays that travels in one Flower ArrayRecord
(`fedlora.arrays.to_record`); `decode` turns it back into dense float32 tensors
of the original shapes, so strategies never see the encoding.

Methods (the `[compression] method` key):
- ``none``: the update itself.
- ``fp16``: each tensor cast to float16 (half the bytes; relative error ~ 2^-11).
- ``int8``: per-tensor symmetric quantization, ``q = round(x / s)`` with
  ``s = max|x| / 127`` and ``q`` in [-127, 127] (a quarter of the bytes plus one
  float32 scale per tensor). Rounding is to the nearest level, not stochastic:
  the error of every element is at most ``s / 2`` (stochastic rounding only
  bounds it by ``s``, with twice the variance), the encoding is deterministic
  (a run is reproducible from its seeds), and the bias that stochastic rounding
  would remove is removed across rounds by error feedback instead.
- ``topk``: per tensor, the ``ceil(fraction * size)`` entries of largest
  magnitude as int32 flat indices (ascending) + float32 values + the int64
  shape; the rest are zero at the coordinator. 8 bytes per kept entry, so it
  saves bytes only for fractions below 1/2.

Error feedback (int8, topk): the site adds what the previous uploads lost (the
residual) to its update before encoding, and keeps ``corrected - decoded`` as
the next residual (`encode_with_feedback`). The sum of what the coordinator
decodes then tracks the sum of the site's true updates up to one bounded
residual, instead of drifting by the compression error of every round.

Sites encode in a ClientApp mod (fedlora.client.mods.compression_mod); the
coordinator decodes in a strategy wrapper (`DecodedUploads`, below), before the
update is checked or any strategy sees it.

Each encoded part is named ``<tensor name>#<part>``. Adapter tensor names are
PyTorch parameter paths (identifiers joined by dots), which never contain '#',
so the parts cannot collide with a tensor name, and `decode` rejects any name
or part it does not expect with a ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from fedlora.strategies.base import SiteUpdate, Strategy, StrategyWrapper

State = dict[str, np.ndarray]

METHODS = ("none", "fp16", "int8", "topk")
FEEDBACK_METHODS = ("int8", "topk")  # fp16 loses too little for a residual to matter
SEP = "#"

# Parts of each method's encoding of one tensor: suffix -> required dtype.
PARTS: dict[str, dict[str, np.dtype]] = {
    "none": {},
    "fp16": {"f16": np.dtype(np.float16)},
    "int8": {"q8": np.dtype(np.int8), "scale": np.dtype(np.float32)},
    "topk": {"idx": np.dtype(np.int32), "val": np.dtype(np.float32), "shape": np.dtype(np.int64)},
}
INT8_LEVELS = 127


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; known: {', '.join(METHODS)}")


def _check_name(name: str) -> None:
    if SEP in name:
        raise ValueError(f"tensor name {name!r} contains {SEP!r}, which compression reserves for its parts")


def topk_count(size: int, fraction: float) -> int:
    """Entries `topk` keeps of a tensor with `size` entries: ceil(fraction * size), at least 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"topk fraction {fraction} not in (0, 1]")
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


def int8_scale(x: np.ndarray) -> np.float32:
    """The per-tensor step s = max|x| / 127 (0 for an all-zero tensor)."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return np.float32(peak / INT8_LEVELS)


def _encode_one(name: str, x: np.ndarray, method: str, fraction: float) -> State:
    if method == "none":
        return {name: x}
    if method == "fp16":
        return {f"{name}{SEP}f16": x.astype(np.float16)}
    if method == "int8":
        scale = int8_scale(x)
        q = np.zeros(x.shape, np.int8) if scale == 0 else \
            np.clip(np.rint(x / scale), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
        return {f"{name}{SEP}q8": q, f"{name}{SEP}scale": np.array([scale], np.float32)}
    flat = x.reshape(-1)
    if flat.size > np.iinfo(np.int32).max:
        raise ValueError(f"tensor {name}: {flat.size} entries cannot be indexed with int32")
    k = topk_count(flat.size, fraction)
    keep = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]) if k < flat.size \
        else np.arange(flat.size)
    return {f"{name}{SEP}idx": keep.astype(np.int32), f"{name}{SEP}val": flat[keep].astype(np.float32),
            f"{name}{SEP}shape": np.array(x.shape, np.int64)}


def encode(update: Mapping[str, np.ndarray], method: str, topk_fraction: float = 0.1) -> State:
    """The update as a flat dict of numpy arrays, ready for `fedlora.arrays.to_record`."""
    _check_method(method)
    if method == "topk":
        topk_count(1, topk_fraction)  # validates the fraction
    out: State = {}
    for name, value in update.items():
        _check_name(name)
        x = np.ascontiguousarray(value, dtype=np.float32)
        out.update(_encode_one(name, x, method, topk_fraction))
    return out


def _group(encoded: Mapping[str, np.ndarray], method: str) -> dict[str, dict[str, np.ndarray]]:
    """Parts by tensor name, after checking that each tensor has exactly its method's parts."""
    parts = PARTS[method]
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in encoded.items():
        name, sep, part = key.rpartition(SEP)
        if not sep or not name:
            raise ValueError(f"not a {method} encoding: part {key!r} lacks a '{SEP}<part>' suffix "
                             f"({', '.join(parts)})")
        if part not in parts:
            raise ValueError(f"not a {method} encoding: part {key!r} has unknown suffix {part!r} "
                             f"(expected one of {', '.join(parts)})")
        _check_name(name)
        if not isinstance(value, np.ndarray) or value.dtype != parts[part]:
            raise ValueError(f"{method} encoding of {name}: part {part!r} has dtype "
                             f"{getattr(value, 'dtype', type(value).__name__)}, expected {parts[part]}")
        groups.setdefault(name, {})[part] = value
    for name, got in groups.items():
        missing = sorted(parts.keys() - got.keys())
        if missing:
            raise ValueError(f"{method} encoding of {name}: missing part(s) {', '.join(missing)}")
    return groups


def _decode_int8(name: str, parts: dict[str, np.ndarray]) -> np.ndarray:
    q, scale = parts["q8"], parts["scale"]
    if scale.shape != (1,) or not np.isfinite(scale[0]) or scale[0] < 0:
        raise ValueError(f"int8 encoding of {name}: scale must be one finite number >= 0, got {scale!r}")
    if q.size and int(np.min(q)) < -INT8_LEVELS:
        raise ValueError(f"int8 encoding of {name}: level {int(np.min(q))} outside [-127, 127]")
    return q.astype(np.float32) * scale[0]


def _topk_shape(name: str, parts: dict[str, np.ndarray]) -> tuple[int, ...]:
    shape = parts["shape"]
    if shape.ndim != 1 or np.any(shape < 0):
        raise ValueError(f"topk encoding of {name}: shape must be a list of sizes >= 0, got {shape.tolist()}")
    return tuple(int(s) for s in shape)


def _decode_topk(name: str, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    idx, val = parts["idx"], parts["val"]
    size = math.prod(shape)
    if idx.ndim != 1 or val.ndim != 1 or idx.size != val.size:
        raise ValueError(f"topk encoding of {name}: indices {idx.shape} and values {val.shape} must be "
                         "1-D and of equal length")
    if idx.size > size:
        raise ValueError(f"topk encoding of {name}: {idx.size} values for a tensor of {size} entries")
    if idx.size and (int(idx[0]) < 0 or int(idx[-1]) >= size or np.any(np.diff(idx) <= 0)):
        raise ValueError(f"topk encoding of {name}: indices must be strictly increasing and in [0, {size})")
    out = np.zeros(size, np.float32)
    out[idx] = val
    return out.reshape(shape)


def decode(encoded: Mapping[str, np.ndarray], method: str, max_elements: int | None = None) -> State:
    """Dense float32 tensors from `encode`'s output; ValueError naming the problem if malformed.

    `max_elements` bounds the total entries decoded (the coordinator passes the size of
    the global adapter), so a forged topk shape cannot make it allocate without limit.
    """
    _check_method(method)
    if method == "none":
        out: State = {}
        for name, value in encoded.items():
            _check_name(name)
            if not isinstance(value, np.ndarray) or value.dtype != np.float32:
                raise ValueError(f"uncompressed tensor {name}: dtype {getattr(value, 'dtype', None)}, "
                                 "expected float32")
            out[name] = value
        groups = {}
    else:
        groups, out = _group(encoded, method), {}
    total = sum(v.size for v in out.values())
    for name, parts in groups.items():
        shape = _topk_shape(name, parts) if method == "topk" else parts["f16" if method == "fp16" else "q8"].shape
        total += math.prod(shape)
        if max_elements is not None and total > max_elements:
            raise ValueError(f"{method} encoding decodes to more than {max_elements} entries (at {name})")
        if method == "fp16":
            out[name] = parts["f16"].astype(np.float32)
        elif method == "int8":
            out[name] = _decode_int8(name, parts)
        else:
            out[name] = _decode_topk(name, parts, shape)
    if max_elements is not None and total > max_elements:
        raise ValueError(f"update has {total} entries, more than {max_elements}")
    return out


def encode_with_feedback(update: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray], method: str,
                         topk_fraction: float = 0.1) -> tuple[State, State]:
    """(encoding of update + residual, the new residual = update + residual − decoded).

    A residual entry counts only where its name and shape match a tensor of this update
    (a tensor the site stopped sending, or whose shape changed, starts from zero).
    """
    corrected: State = {}
    for name, value in update.items():
        x = np.asarray(value, dtype=np.float32)
        r = residual.get(name)
        corrected[name] = x + r if r is not None and r.shape == x.shape else x
    encoded = encode(corrected, method, topk_fraction)
    decoded = decode(encoded, method)
    return encoded, {name: (corrected[name] - decoded[name]).astype(np.float32) for name in corrected}


class DecodedUploads(StrategyWrapper):
    """The server side of upload compression: each update is decoded into dense float32 tensors
    before it is checked and aggregated; a malformed encoding is a rejected update."""

    needs_individual = "the coordinator decodes each site's upload on its own"
    under_secure_aggregation = ("; secure aggregation already fixed-point encodes each update (secagg.bytes-per-param "
                                "sets its width): set compression.method = 'none'")

    def __init__(self, inner: Strategy, method: str):
        super().__init__(inner)
        _check_method(method)
        self.method = method

    def accept(self, update: SiteUpdate, global_state: State) -> tuple[SiteUpdate, str | None]:
        try:  # bounded by the global adapter's size, so a forged encoding cannot exhaust memory
            delta = decode(update.delta, self.method, max_elements=sum(v.size for v in global_state.values()))
        except ValueError as err:
            return update, f"malformed {self.method} upload: {err}"
        return self.inner.accept(replace(update, delta=delta), global_state)
