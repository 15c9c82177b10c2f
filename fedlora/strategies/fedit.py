"""FedIT: FedAvg applied to the LoRA factors A and B separately.

The common baseline (Zhang et al., 2024, "Towards Building the Federated GPT").
It is inexact: mean(B)·mean(A) ≠ mean(B·A), so the global adapter is not the
average of what the sites learned; `aggregation_error` shows by how much. It is
linear in the updates, so it works under secure aggregation.
"""

from __future__ import annotations

from fedlora.strategies.base import Aggregate, SiteUpdate, State, Strategy, add_delta, weighted_mean


class FedIT(Strategy):
    name = "fedit"
    summary = "FedAvg of A and B separately (baseline; inexact)"

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        return Aggregate(add_delta(global_state, weighted_mean(updates)))
