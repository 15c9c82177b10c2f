"""Krum (Blanchard et al., 2017): keep the update closest to its neighbours.

A site's score is the sum of squared distances to its n − f − 2 nearest other
updates, f being the number of faulty sites tolerated (`strategy.byzantine`);
the update with the lowest score becomes the round's update. Needs n ≥ 2f + 3.
Multi-Krum (multi_krum.py) averages the m best instead. See robust.py.
"""

from __future__ import annotations

import numpy as np

from fedlora.strategies.base import Aggregate, SiteUpdate, State, add_delta, weighted_mean
from fedlora.strategies.robust import RobustStrategy, stack


def krum_scores(matrix: np.ndarray, byzantine: int) -> np.ndarray:
    """Each row's sum of squared distances to its n − f − 2 nearest other rows."""
    n = matrix.shape[0]
    if n < 2 * byzantine + 3:
        raise ValueError(f"Krum with byzantine = {byzantine} needs at least {2 * byzantine + 3} updates, got {n}")
    sq = np.sum(matrix ** 2, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * matrix @ matrix.T, 0.0)
    nearest = np.sort(dist + np.diag(np.full(n, np.inf)), axis=1)[:, :n - byzantine - 2]
    return nearest.sum(axis=1)


def krum_select(matrix: np.ndarray, byzantine: int, keep: int) -> list[int]:
    """Indices of the `keep` rows with the lowest Krum scores, best first (ties: lower index)."""
    return [int(i) for i in np.argsort(krum_scores(matrix, byzantine), kind="stable")[:keep]]


class Krum(RobustStrategy):
    name = "krum"
    summary = "the one update closest to its neighbours (robust)"

    def __init__(self, byzantine: int = 1, keep: int = 1, **common):
        super().__init__(**common)
        self.byzantine, self.keep = byzantine, keep

    @classmethod
    def from_config(cls, config) -> "Krum":
        return cls(byzantine=config.strategy.byzantine, **cls.common_options(config))

    def how_many(self, n: int) -> int:
        return self.keep

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        chosen = krum_select(stack(updates, sorted(global_state)), self.byzantine, self.how_many(len(updates)))
        delta = weighted_mean([updates[i] for i in chosen])
        return Aggregate(add_delta(global_state, delta), metrics={"krum_selected": [updates[i].site for i in chosen]})
