"""FedEx-LoRA: averaged factors, plus the residual folded into the frozen weights.

Singhal et al., 2025, "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models". The global adapter is FedIT's
(Ā, B̄) at the usual rank, and the error term Σ wᵢ Bᵢ·Aᵢ − B̄·Ā goes into the
sites' frozen weights, so adapter + base together hold exactly the weighted
mean of what the sites learned. A smaller-rank site's update is zero beyond
its rank (it keeps the global components it never held), and it enters the
residual at its own rank plus those kept global components, so the result
stays exact.

SVD downlink: a site of rank r trains the first r components of the global
adapter. In a round where some site trained below lora.rank, the new adapter
is re-factored in SVD order (factors.svd_ordered: same B̄·Ā, so the residual
and exactness are unchanged), so those first r components are the best rank-r
approximation of the adapter's ΔW; the part the site does not receive is kept
by the server and counted back in (the global components beyond its rank) when
its full ΔW is formed. A federation where every site trains at lora.rank gets
the paper's FedEx unchanged.

Down: the adapter plus the cumulative residual (rank ≤ (n + 1)·r per round
while factored, else dense d·k per layer). Up: the whole update.
"""

from __future__ import annotations

from fedlora.strategies.base import Aggregate, SiteUpdate, State, add_delta, weighted_mean
from fedlora.strategies.factors import lora_layers, state_rank, svd_ordered
from fedlora.strategies.folding import FoldingStrategy


class FedEx(FoldingStrategy):
    name = "fedex"
    summary = "FedIT's factors plus the residual folded into the base (exact)"

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        state = add_delta(global_state, weighted_mean(updates))
        full = state_rank(global_state)
        if any(u.rank and u.rank < full for u in updates):
            for a, b in lora_layers(state).values():
                state[a], state[b] = svd_ordered(state[a], state[b])
        return Aggregate(state, folded=self.residuals(global_state, updates, state))
