"""Privacy accounting: pure functions of a history of subsampled Gaussian mechanisms.

A history is a tuple of `Mechanism(noise_multiplier, sample_rate, steps)`: `steps`
compositions of the Poisson-subsampled Gaussian mechanism. A site's rounds compose
as one long DP-SGD run (same maths, steps add up), and client-level DP is the same
mechanism with one step per round, so one history describes either. Nothing here
keeps state: a site's history lives in its ledger (ledger.py); these functions turn
a history into epsilon, or a budget into a noise multiplier.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, NamedTuple

from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis


class Mechanism(NamedTuple):
    noise_multiplier: float
    sample_rate: float
    steps: int


History = tuple[Mechanism, ...]

# Opacus' default orders plus larger ones: at low noise the best order is beyond 63.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
                   + [80, 96, 128, 192, 256, 512, 1024])
PRV_EPS_ERROR = 0.01  # the PRV accountant returns an upper bound within this of the true epsilon
MAX_NOISE_MULTIPLIER = 1e4


class CalibrationError(ValueError):
    """No noise multiplier meets the budget (e.g. it is already spent)."""


def canonical(history) -> History:
    """Merge entries with the same (sigma, q) and drop empty ones: composition is
    commutative, and fewer distinct entries make PRV composition faster."""
    steps: dict[tuple[float, float], int] = {}
    for m in history:
        if m.steps < 0 or not 0 < m.sample_rate <= 1 or m.noise_multiplier < 0:
            raise ValueError(f"invalid mechanism {m}")
        if m.steps:
            key = (float(m.noise_multiplier), float(m.sample_rate))
            steps[key] = steps.get(key, 0) + int(m.steps)
    return tuple(Mechanism(s, q, n) for (s, q), n in sorted(steps.items()))


@lru_cache(maxsize=4096)
def _epsilon_rdp(history: History, delta: float) -> float:
    rdp = 0.0
    for sigma, q, steps in history:
        rdp = rdp + rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=RDP_ORDERS)
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=4096)
def _epsilon_prv(history: History, delta: float) -> float:
    # Opacus' PRV accountant used as a calculator: a throwaway object per history.
    calculator = PRVAccountant()
    calculator.history = [(sigma, q, steps) for sigma, q, steps in history]
    return float(calculator.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


def epsilon_rdp(history, delta: float) -> float:
    """Epsilon at `delta` by Renyi DP (Mironov et al. 2019), Opacus' analysis."""
    return _epsilon(history, delta, _epsilon_rdp)


def epsilon_prv(history, delta: float) -> float:
    """Epsilon at `delta` by numerical PRV composition (Gopi et al. 2021): an upper bound."""
    return _epsilon(history, delta, _epsilon_prv)


def _epsilon(history, delta: float, compute: Callable[[History, float], float]) -> float:
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta} not in (0, 1)")
    h = canonical(history)
    if not h:
        return 0.0
    if any(m.noise_multiplier == 0 for m in h):
        return math.inf  # a step without noise has no finite guarantee
    return compute(h, float(delta))


ACCOUNTANTS: dict[str, Callable[..., float]] = {"prv": epsilon_prv, "rdp": epsilon_rdp}


def epsilon(history, delta: float, accountant: str = "prv") -> float:
    return ACCOUNTANTS[accountant](history, delta)


def epsilon_by_round(noise_multiplier: float, sample_rate: float, steps_per_round: int, rounds: int,
                     delta: float, accountant: str = "prv") -> list[float]:
    """Epsilon after each of `rounds` rounds of `steps_per_round` steps."""
    return [epsilon([Mechanism(noise_multiplier, sample_rate, steps_per_round * r)], delta, accountant)
            for r in range(1, rounds + 1)]


def round_up(sigma: float, digits: int = 3) -> float:
    """Round up to `digits` significant digits: a stable value that repeated
    calibrations reproduce, never below what the budget needs."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(sigma)))
    return math.ceil(sigma * scale - 1e-9) / scale


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    spent=(), accountant: str = "prv", tolerance: float = 0.002) -> float:
    """The smallest noise multiplier (to 3 significant digits, rounded up) such that
    `spent` plus `steps` more steps at `sample_rate` stays within `target_epsilon`."""
    spent = canonical(spent)

    def fits(sigma: float) -> bool:
        return epsilon(spent + (Mechanism(sigma, sample_rate, steps),), delta, accountant) <= target_epsilon

    if epsilon(spent, delta, accountant) >= target_epsilon:
        raise CalibrationError(f"budget epsilon {target_epsilon} is already spent")
    # RDP bounds PRV from above in practice and is fast: bracket with it first.
    hi = 1.0
    while not fits_rdp(spent, sample_rate, steps, hi, delta, target_epsilon) and hi < MAX_NOISE_MULTIPLIER:
        hi *= 2
    while not fits(hi):
        if hi >= MAX_NOISE_MULTIPLIER:
            raise CalibrationError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} meets epsilon "
                                   f"{target_epsilon} (delta {delta}, q {sample_rate:.4g}, {steps} steps)")
        hi *= 2
    lo = hi / 2
    while fits(lo) and lo > 1e-3:
        hi, lo = lo, lo / 2
    while hi / lo > 1 + tolerance:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    sigma = round_up(hi)
    assert fits(sigma)
    return sigma


def fits_rdp(spent: History, sample_rate: float, steps: int, sigma: float, delta: float,
             target_epsilon: float) -> bool:
    return epsilon_rdp(spent + (Mechanism(sigma, sample_rate, steps),), delta) <= target_epsilon
