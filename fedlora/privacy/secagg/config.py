"""Protocol parameters chosen by the server, and their defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .encoding import DEFAULT_CLIP_RANGE, Quantizer
from .errors import SecAggConfigError
from .graph import default_degree, default_threshold, effective_degree, weak_threshold_problem

MIN_CLIENTS = 3  # with two, each client learns the other's update from the sum


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation settings; ``None`` picks the documented default for n clients.

    threshold: shares needed to rebuild a client's secret (t). Default: a strict
        majority of a neighbourhood, (degree + 1) // 2 + 1. Fewer than t
        colluding neighbours plus the server learn nothing about an individual
        update; up to degree + 1 - t neighbours of a client may drop out.
    degree: neighbours per client (k). Default: all-to-all for n <= 32, else
        about 4 * log2(n), rounded up to even.
    clip_range: R; each coordinate is clipped to [-R, R] before quantization.
    bits: fixed-point width of one client's value. Default: the most precise
        that fits ``bytes_per_param`` bytes for n clients.
    bytes_per_param: upload width (1-4) used when ``bits`` is None.
    min_survivors: fewest clients whose inputs may be summed. Default max(t, 3).
    allow_weak_threshold: accept a threshold at most half a neighbourhood, which a coordinator
        sending inconsistent dropout lists can defeat (refused otherwise).
    """

    threshold: int | None = None
    degree: int | None = None
    clip_range: float = DEFAULT_CLIP_RANGE
    bits: int | None = None
    bytes_per_param: int = 4
    min_survivors: int | None = None
    allow_weak_threshold: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.threshold is not None and self.threshold < 2:
            problems.append(f"threshold must be >= 2 (1 share would reveal a secret), got {self.threshold}")
        if self.degree is not None and self.degree < 2:
            problems.append(f"degree must be >= 2, got {self.degree}")
        clip = self.clip_range
        if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            problems.append(f"clip_range must be a finite number > 0, got {self.clip_range!r}")
        if self.bits is not None and not 2 <= self.bits <= 32:
            problems.append(f"bits must be in [2, 32], got {self.bits}")
        if self.bytes_per_param not in (1, 2, 3, 4):
            problems.append(f"bytes_per_param must be 1, 2, 3 or 4, got {self.bytes_per_param}")
        if self.min_survivors is not None and self.min_survivors < 2:
            problems.append(f"min_survivors must be >= 2, got {self.min_survivors}")
        if problems:
            raise SecAggConfigError("invalid SecAggConfig: " + "; ".join(problems))

    def resolve(self, n: int) -> "SessionParams":
        """Concrete, validated parameters for a session of ``n`` clients."""
        if n < MIN_CLIENTS:
            raise SecAggConfigError(f"secure aggregation needs >= {MIN_CLIENTS} clients, got {n}")
        degree = effective_degree(n, self.degree if self.degree is not None else default_degree(n))
        threshold = self.threshold if self.threshold is not None else default_threshold(degree)
        if threshold > degree + 1:
            raise SecAggConfigError(
                f"threshold {threshold} exceeds the neighbourhood size {degree + 1} (degree {degree} + self)"
            )
        weak = weak_threshold_problem(threshold, degree)
        if weak and not self.allow_weak_threshold:
            raise SecAggConfigError(weak)
        quantizer = Quantizer.for_clients(n, self.clip_range, self.bits, self.bytes_per_param)
        min_survivors = self.min_survivors if self.min_survivors is not None else max(threshold, MIN_CLIENTS)
        if min_survivors > n:
            raise SecAggConfigError(f"min_survivors {min_survivors} exceeds the {n} participants")
        return SessionParams(threshold, degree, quantizer, min_survivors)


@dataclass(frozen=True)
class SessionParams:
    """Resolved parameters of one session."""

    threshold: int
    degree: int
    quantizer: Quantizer
    min_survivors: int
