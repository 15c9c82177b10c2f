"""FedAdam: v ← β₂·v + (1 − β₂)·Δ² (see fedopt.py)."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.strategies.fedopt import AdaptiveServerOptimizer, SecondMomentParams


@dataclass
class FedAdamParams(SecondMomentParams):
    NAME = "strategy.fedadam"


class FedAdam(AdaptiveServerOptimizer):
    name = "fedadam"
    summary = "Adam on the mean update at the server"
    params = FedAdamParams

    def second_moment(self, v, g2):
        return self.p.beta2 * v + (1 - self.p.beta2) * g2
