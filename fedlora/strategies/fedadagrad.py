"""FedAdagrad: v ← v + Δ² (see fedopt.py)."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.strategies.fedopt import AdaptiveServerOptimizer, FedOptParams


@dataclass
class FedAdagradParams(FedOptParams):
    NAME = "strategy.fedadagrad"


class FedAdagrad(AdaptiveServerOptimizer):
    name = "fedadagrad"
    summary = "Adagrad on the mean update at the server"
    params = FedAdagradParams

    def second_moment(self, v, g2):
        return v + g2
