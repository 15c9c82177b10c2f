"""Shamir secret sharing over the prime field GF(2^521 - 1).

The field holds any 32-byte secret (a mask seed or an X25519 private key) with
room to spare. A share is the point (x, f(x)) of a random polynomial f of
degree threshold-1 with f(0) = secret; x is derived from the holder's node id,
so a share needs no index of its own on the wire.
"""

from __future__ import annotations

import secrets
from typing import Sequence

PRIME = 2**521 - 1
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66
_ID_SPACE = 2**64


class InconsistentShares(ValueError):
    """Some shares do not lie on the polynomial defined by the first ``threshold``."""

    def __init__(self, bad_indices: Sequence[int]) -> None:
        super().__init__(f"shares at positions {list(bad_indices)} are inconsistent")
        self.bad_indices = list(bad_indices)


def share_x(node_id: int) -> int:
    """Evaluation point of a holder: its 64-bit id plus one (never 0, always < PRIME)."""
    if not -(2**63) <= node_id < _ID_SPACE:
        raise ValueError(f"node id {node_id} does not fit in 64 bits")
    return node_id % _ID_SPACE + 1


def split(secret: int, threshold: int, xs: Sequence[int]) -> list[int]:
    """Return f(x) for each x, where f has random coefficients and f(0) = secret."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret must lie in [0, PRIME)")
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if len(xs) < threshold:
        raise ValueError(f"need at least {threshold} holders, got {len(xs)}")
    if len({x % PRIME for x in xs}) != len(xs) or any(x % PRIME == 0 for x in xs):
        raise ValueError("evaluation points must be distinct and non-zero")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [_horner(coeffs, x) for x in xs]


def interpolate_at(points: Sequence[tuple[int, int]], x: int) -> int:
    """Value at ``x`` of the unique polynomial of degree < len(points) through ``points``."""
    xs = [p[0] % PRIME for p in points]
    if len(set(xs)) != len(xs):
        raise ValueError("duplicate evaluation points")
    x %= PRIME
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct(points: Sequence[tuple[int, int]], threshold: int) -> int:
    """Rebuild f(0) from the first ``threshold`` points; check any extra points agree.

    Raises ``ValueError`` with fewer than ``threshold`` points and
    ``InconsistentShares`` when an extra point is off the polynomial.
    """
    if len(points) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(points)}")
    bad = find_inconsistent(points, threshold)
    if bad:
        raise InconsistentShares(bad)
    return interpolate_at(points[:threshold], 0)


def find_inconsistent(points: Sequence[tuple[int, int]], threshold: int) -> list[int]:
    """Positions (>= threshold) of points off the polynomial through the first ``threshold``."""
    base = list(points[:threshold])
    return [
        threshold + k
        for k, (x, y) in enumerate(points[threshold:])
        if interpolate_at(base, x) != y % PRIME
    ]


def encode_share(y: int) -> bytes:
    """Fixed-width big-endian encoding of a field element."""
    return y.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    """Inverse of ``encode_share``; rejects wrong lengths and values >= PRIME."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("share value is outside the field")
    return y


def _horner(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc
