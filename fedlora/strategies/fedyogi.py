"""FedYogi: v ← v − (1 − β₂)·Δ²·sign(v − Δ²), a more cautious growth of v (see fedopt.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlora.strategies.fedopt import AdaptiveServerOptimizer, SecondMomentParams


@dataclass
class FedYogiParams(SecondMomentParams):
    NAME = "strategy.fedyogi"


class FedYogi(AdaptiveServerOptimizer):
    name = "fedyogi"
    summary = "Yogi on the mean update at the server"
    params = FedYogiParams

    def second_moment(self, v, g2):
        return v - (1 - self.p.beta2) * g2 * np.sign(v - g2)
