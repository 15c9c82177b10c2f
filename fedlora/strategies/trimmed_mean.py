"""Coordinate-wise trimmed mean (Yin et al., 2018).

Per coordinate, drop the ⌊β·n⌋ largest and smallest values over the sites and
average the rest (β = `strategy.trim-fraction`). Unweighted; see robust.py.
"""

from __future__ import annotations

import numpy as np

from fedlora.strategies.base import Aggregate, SiteUpdate, State, add_delta
from fedlora.strategies.robust import RobustStrategy, stack, unstack


def trimmed_mean(matrix: np.ndarray, fraction: float) -> np.ndarray:
    n = matrix.shape[0]
    cut = int(np.floor(fraction * n))
    if n - 2 * cut < 1:
        raise ValueError(f"trimmed mean: trimming {cut} of {n} updates from each end leaves none")
    return np.sort(matrix, axis=0)[cut:n - cut].mean(axis=0)


class TrimmedMean(RobustStrategy):
    name = "trimmed-mean"
    summary = "coordinate-wise trimmed mean of the updates (robust)"

    def __init__(self, fraction: float = 0.2, **common):
        super().__init__(**common)
        self.fraction = fraction

    @classmethod
    def from_config(cls, config) -> "TrimmedMean":
        return cls(fraction=config.strategy.trim_fraction, **cls.common_options(config))

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        keys = sorted(global_state)
        delta = unstack(trimmed_mean(stack(updates, keys), self.fraction), global_state, keys)
        return Aggregate(add_delta(global_state, delta))
