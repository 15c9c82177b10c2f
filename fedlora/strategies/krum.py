"""Krum (Blanchard et al., 2017): keep the update closest to its neighbours.

A site's score is the sum of squared distances to its n − f − 2 nearest other
updates, f being the number of faulty sites tolerated (`strategy.krum.byzantine`);
the update with the lowest score becomes the round's update. Needs n ≥ 2f + 3.
Multi-Krum (multi_krum.py) averages the m best instead. See robust.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlora.options import Problems, Section, option
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


@dataclass
class KrumParams(Section):
    NAME = "strategy.krum"
    byzantine: int = option(1, "Faulty sites f tolerated; a round needs at least 2f + 3 updates.")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.byzantine >= 0, f"{self.NAME}.byzantine: {self.byzantine} must be >= 0")
        return p


class Krum(RobustStrategy):
    name = "krum"
    summary = "the one update closest to its neighbours (robust)"
    params = KrumParams

    def min_updates(self) -> tuple[int, str]:
        return 2 * self.p.byzantine + 3, f"{self.p.NAME}.byzantine = {self.p.byzantine}"

    def how_many(self, n: int) -> int:
        return 1

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        chosen = krum_select(stack(updates, sorted(global_state)), self.p.byzantine, self.how_many(len(updates)))
        delta = weighted_mean([updates[i] for i in chosen])
        return Aggregate(add_delta(global_state, delta), metrics={"krum_selected": [updates[i].site for i in chosen]})
