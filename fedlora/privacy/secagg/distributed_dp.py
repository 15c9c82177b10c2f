"""Distributed DP under secure aggregation: each site noises its own update before masking.

Unit of privacy: a whole site (its update, whatever its data). Each site clips
its update to L2 norm C and adds N(0, (sigma*C)^2 / t) per coordinate, t being
the session threshold. A site only unmasks when at least t sites are in the
sum (client.py refuses otherwise), so the revealed sum carries Gaussian noise
of std >= sigma*C and the coordinator never sees an un-noised sum. Every site
weighs 1 and reports no loss, so the sum's L2 sensitivity to one site (its
update replaced by zero, the add/remove relation of DP-FedAvg) is C.

Accounting: one Gaussian mechanism of multiplier sigma per released round, no
amplification by sampling (the coordinator's sampling is public). T such
rounds are exactly mu-GDP with mu = sqrt(T)/sigma (Dong, Roth, Su 2019), which
gives the exact (epsilon, delta) below; the RDP bound of the privacy package is
reported beside it. Not accounted: noise from more than t survivors (extra
privacy, ignored), colluding sites (each subtracts its own noise: with c
colluders the sum carries only (t - c)/t of the variance), the floating-point
Gaussian sampler (formal versions use discrete Gaussian noise, Kairouz et al. 2021).
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from fedlora.privacy.accounting import Mechanism, epsilon_rdp
from fedlora.privacy.client_dp import clip_update

State = dict[str, np.ndarray]


def site_noise_std(noise_multiplier: float, clip: float, threshold: int) -> float:
    """Per-coordinate noise std one site adds: sigma*C/sqrt(t)."""
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    return noise_multiplier * clip / math.sqrt(threshold)


def clip_and_noise(delta: State, clip: float, std: float, rng: np.random.Generator | None = None) -> tuple[State, float]:
    """The update clipped to L2 norm `clip` plus N(0, std^2) per coordinate (float64); and its norm before."""
    rng = rng or np.random.default_rng(secrets.randbits(128))  # secret: a known seed lets anyone subtract it
    clipped, norm = clip_update(delta, clip)
    return {k: v + rng.normal(0.0, std, size=v.shape) for k, v in clipped.items()}, norm


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps * Phi(-eps/mu - mu/2)."""
    return _normal_cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * _normal_cdf(-epsilon / mu - mu / 2)


def epsilon_exact(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Exact epsilon of `rounds` Gaussian releases of multiplier sigma (no sampling), at `delta`."""
    return epsilon_of_releases([noise_multiplier] * rounds, delta)


def epsilon_of_releases(noise_multipliers: list[float], delta: float) -> float:
    """Exact epsilon of Gaussian releases of these multipliers (no sampling): mu-GDP with
    mu = sqrt(sum 1/sigma^2) (Dong, Roth, Su 2019), at `delta`."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    mu = math.sqrt(sum(1 / s ** 2 for s in noise_multipliers))
    lo, hi = 0.0, 1.0
    while gdp_delta(hi, mu) > delta:
        lo, hi = hi, 2 * hi
        if hi > 700:  # e^eps overflows beyond; such an epsilon means no protection anyway
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gdp_delta(mid, mu) > delta else (lo, mid)
    return hi


def spent(noise_multiplier: float, rounds: int, delta: float) -> dict[str, float]:
    """Site-level epsilon after `rounds` released rounds: exact (GDP) and the RDP upper bound."""
    rdp = epsilon_rdp([Mechanism(noise_multiplier, 1.0, rounds)], delta) if rounds else 0.0
    return {"epsilon": epsilon_exact(noise_multiplier, rounds, delta), "epsilon_rdp": rdp, "delta": delta}
