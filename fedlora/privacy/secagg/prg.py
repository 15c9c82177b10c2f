"""Mask expansion: a 256-bit seed -> a pseudorandom vector, via ChaCha20.

The keystream is a cryptographic PRG, so masks are computationally
indistinguishable from uniform (numpy's seeded generators are not, and Flower's
32-bit seed fold let different keys collide). Each seed is used for exactly one
mask, so a fixed nonce is safe. Words are read little-endian so every machine
expands a seed to the same vector.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
_NONCE = bytes(16)  # ChaCha20 in `cryptography`: 4-byte counter (0) + 12-byte nonce
_CHUNK_BYTES = 1 << 18  # keystream chunk that stays in cache while it is added


def expand_into(seed: bytes, out: np.ndarray) -> np.ndarray:
    """Overwrite ``out`` (C-contiguous unsigned ints) with the keystream of ``seed``."""
    view = _byte_view(out)
    # Encrypting zeros yields the raw keystream, written straight into `out`.
    _keystream(seed).update_into(bytes(view.nbytes), view)
    return out


def expand(seed: bytes, length: int, dtype: np.dtype | type = np.uint32) -> np.ndarray:
    """New array of ``length`` pseudorandom words of ``dtype``."""
    return expand_into(seed, np.empty(length, dtype=np.dtype(dtype).newbyteorder("<")))


def apply_mask(target: np.ndarray, seed: bytes, *, subtract: bool = False) -> np.ndarray:
    """``target += expand(seed)`` (or ``-=``), wrapping mod 2^(8*itemsize), in place.

    Same result as adding the full expansion, but chunked so the keystream is
    added while still in cache (about twice as fast on large vectors).
    """
    _byte_view(target)
    encryptor = _keystream(seed)
    step = max(1, _CHUNK_BYTES // target.itemsize)
    scratch = np.empty(min(step, target.size), dtype=target.dtype)
    zeros = bytes(scratch.nbytes)
    op = np.subtract if subtract else np.add
    for start in range(0, target.size, step):
        part = target[start : start + step]
        buf = scratch[: part.size]
        encryptor.update_into(zeros[: buf.nbytes], memoryview(buf).cast("B"))
        op(part, buf, out=part)
    return target


def _keystream(seed: bytes):
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seeds are {SEED_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()


def _byte_view(out: np.ndarray) -> memoryview:
    if out.dtype.kind != "u" or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("mask arrays must be writeable C-contiguous unsigned integer arrays")
    if out.dtype.byteorder == ">" or (out.dtype.byteorder == "=" and not np.little_endian):
        raise ValueError("mask arrays must be little-endian")
    return memoryview(out).cast("B")
