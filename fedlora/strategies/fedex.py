"""FedEx-LoRA: averaged factors, plus the residual folded into the frozen weights.

Singhal et al., 2025, "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models". The global adapter is FedIT's
(Ā, B̄) at the usual rank, and the error term Σ wᵢ Bᵢ·Aᵢ − B̄·Ā goes into the
sites' frozen weights, so adapter + base together hold exactly the weighted
mean of what the sites learned. Smaller-rank sites are zero-padded in the
averages and enter the residual at their own rank, so the result stays exact.

Down: the adapter plus the cumulative residual (rank ≤ (n + 1)·r per round
while factored, else dense d·k per layer). Up: the whole update.
"""

from __future__ import annotations

from fedlora.strategies.base import Aggregate, SiteUpdate, State, add_delta, weighted_mean
from fedlora.strategies.folding import FoldingStrategy


class FedEx(FoldingStrategy):
    name = "fedex"
    summary = "FedIT's factors plus the residual folded into the base (exact)"

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        state = add_delta(global_state, weighted_mean(updates))
        return Aggregate(state, folded=self.residuals(global_state, updates, state))
