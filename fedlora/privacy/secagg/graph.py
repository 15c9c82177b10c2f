"""Neighbour graph of SecAgg+: who masks with, and holds shares of, whom.

A pure function of (participant ids, degree, seed), so the server and every
client derive the same graph from the setup message. The graph is a Harary
graph (ring, each node linked to the degree/2 nearest on each side) over a
seeded random permutation of the ids, as in Bell et al. 2020; with
degree >= n - 1 it is complete (plain SecAgg).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from .errors import SecAggConfigError

COMPLETE_GRAPH_MAX_N = 32


def default_degree(n: int) -> int:
    """All-to-all up to 32 clients; beyond, the even k >= 4 * ceil(log2 n) (O(log n))."""
    if n <= COMPLETE_GRAPH_MAX_N:
        return n - 1
    k = 4 * (n - 1).bit_length()
    return min(n - 1, k + (k % 2))


def default_threshold(degree: int) -> int:
    """A strict majority of a neighbourhood (degree + 1 clients, self included), the smallest safe
    threshold: a client's self-mask shares are held by its neighbourhood (itself included) and its
    mask-key shares by its `degree` neighbours, so a coordinator that sends some of them "it
    survived" and others "it dropped" collects t of each only if 2t <= degree + 1."""
    return (degree + 1) // 2 + 1


def weak_threshold_problem(threshold: int, degree: int) -> str | None:
    """Why `threshold` lets a coordinator unmask one client with inconsistent dropout lists, or None."""
    safe = default_threshold(degree)
    if threshold >= safe:
        return None
    return (f"threshold {threshold} is at most half the neighbourhood of {degree + 1}: a coordinator that sends "
            f"different dropout lists to different sites could collect {threshold} self-mask shares and "
            f"{threshold} mask-key shares of one site and unmask its update; use a threshold >= {safe}")


def effective_degree(n: int, degree: int) -> int:
    """Degree the graph really has: odd degrees round up to even, capped at n - 1."""
    if degree < 2:
        raise SecAggConfigError(f"degree must be >= 2, got {degree}")
    if degree >= n - 1:
        return n - 1
    return degree + (degree % 2)


def neighbour_graph(participants: Sequence[int], degree: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """Neighbours of every participant (self excluded), sorted by id."""
    ids = sorted(participants)
    if len(set(ids)) != len(ids):
        raise SecAggConfigError("participant ids must be distinct")
    n = len(ids)
    k = effective_degree(n, degree)
    if k == n - 1:
        return {i: tuple(j for j in ids if j != i) for i in ids}
    ring = _permute(ids, seed)
    half = k // 2
    return {
        node: tuple(sorted(ring[(pos + d) % n] for d in range(-half, half + 1) if d != 0))
        for pos, node in enumerate(ring)
    }


def _permute(ids: list[int], seed: bytes) -> list[int]:
    """Fisher-Yates shuffle driven by SHA-256(seed, counter); identical on every platform."""
    out = list(ids)
    counter = 0

    def below(bound: int) -> int:
        nonlocal counter
        limit = 2**64 - (2**64 % bound)  # rejection sampling keeps it unbiased
        while True:
            digest = hashlib.sha256(b"fedlora-secagg-graph|" + seed + counter.to_bytes(8, "big"))
            counter += 1
            r = int.from_bytes(digest.digest()[:8], "big")
            if r < limit:
                return r % bound

    for i in range(len(out) - 1, 0, -1):
        j = below(i + 1)
        out[i], out[j] = out[j], out[i]
    return out
