"""FedIT: FedAvg applied to the LoRA factors A and B separately.

The common baseline (Zhang et al., 2024, "Towards Building the Federated GPT").
It is inexact: mean(B)·mean(A) ≠ mean(B·A), so the global adapter is not the
average of what the sites learned. It is linear in the updates, so it works
under secure aggregation.
"""

from __future__ import annotations

from fedlora.strategies.base import SiteUpdate, State, Strategy, weighted_mean


class FedIT(Strategy):
    name = "fedit"

    def aggregate(self, global_state: State, updates: list[SiteUpdate]) -> State:
        mean_delta = weighted_mean(updates)
        return {k: global_state[k] + mean_delta[k] for k in global_state}
