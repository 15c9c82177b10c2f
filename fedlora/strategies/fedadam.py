"""FedAdam: v ← β₂·v + (1 − β₂)·Δ² (see fedopt.py)."""

from __future__ import annotations

from fedlora.strategies.fedopt import AdaptiveServerOptimizer


class FedAdam(AdaptiveServerOptimizer):
    name = "fedadam"
    summary = "Adam on the mean update at the server"

    def second_moment(self, v, g2):
        return self.beta2 * v + (1 - self.beta2) * g2
