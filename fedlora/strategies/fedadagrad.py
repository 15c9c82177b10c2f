"""FedAdagrad: v ← v + Δ² (see fedopt.py)."""

from __future__ import annotations

from fedlora.strategies.fedopt import AdaptiveServerOptimizer


class FedAdagrad(AdaptiveServerOptimizer):
    name = "fedadagrad"
    summary = "Adagrad on the mean update at the server"

    def second_moment(self, v, g2):
        return v + g2
