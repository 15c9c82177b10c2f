"""Coordinate-wise trimmed mean (Yin et al., 2018).

Per coordinate, drop the ⌊β·n⌋ largest and smallest values over the sites and
average the rest (β = `strategy.trimmed-mean.fraction`). Unweighted; see robust.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlora.options import Problems, Section, option
from fedlora.strategies.base import Aggregate, SiteUpdate, State, add_delta
from fedlora.strategies.robust import RobustStrategy, stack, unstack


def trimmed_mean(matrix: np.ndarray, fraction: float) -> np.ndarray:
    n = matrix.shape[0]
    cut = int(np.floor(fraction * n))
    if n - 2 * cut < 1:
        raise ValueError(f"trimmed mean: trimming {cut} of {n} updates from each end leaves none")
    return np.sort(matrix, axis=0)[cut:n - cut].mean(axis=0)


@dataclass
class TrimmedMeanParams(Section):
    NAME = "strategy.trimmed-mean"
    fraction: float = option(0.2, "Share of the sites' values dropped at each end, per coordinate (in [0, 0.5)).")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(0 <= self.fraction < 0.5, f"{self.NAME}.fraction: {self.fraction} not in [0, 0.5)")
        return p


class TrimmedMean(RobustStrategy):
    name = "trimmed-mean"
    summary = "coordinate-wise trimmed mean of the updates (robust)"
    params = TrimmedMeanParams

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        keys = sorted(global_state)
        delta = unstack(trimmed_mean(stack(updates, keys), self.p.fraction), global_state, keys)
        return Aggregate(add_delta(global_state, delta))
