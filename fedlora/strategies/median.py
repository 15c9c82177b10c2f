"""Coordinate-wise median of the updates (Yin et al., 2018).

Each coordinate of the new update is the median over sites, so fewer than
half of the sites cannot drag it arbitrarily far. Unweighted; see robust.py.
"""

from __future__ import annotations

import numpy as np

from fedlora.strategies.base import Aggregate, SiteUpdate, State, add_delta
from fedlora.strategies.robust import RobustStrategy, stack, unstack


def coordinate_median(matrix: np.ndarray) -> np.ndarray:
    return np.median(matrix, axis=0)


class Median(RobustStrategy):
    name = "median"
    summary = "coordinate-wise median of the updates (robust)"

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        keys = sorted(global_state)
        delta = unstack(coordinate_median(stack(updates, keys)), global_state, keys)
        return Aggregate(add_delta(global_state, delta))
