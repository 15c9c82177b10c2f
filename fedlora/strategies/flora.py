"""FLoRA: stacking of the site adapters, folded into the base; the adapter restarts each round.

Wang et al., 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations". The stacked factors [w₁B₁ … wₙBₙ]·[A₁; …; Aₙ]
equal Σ wᵢ Bᵢ·Aᵢ exactly, whatever each site's rank. The stack is added to the
sites' frozen weights (the coordinator keeps the cumulative correction and
sends it with every message, see correction.py), and every round starts again
from A = the shared initialization, B = 0. Dense tensors (a task head) are averaged.

Down: the adapter plus the cumulative correction, which grows by Σ rᵢ·(d + k)
values per layer and round until it is sent dense (d·k). Up: the whole update.
"""

from __future__ import annotations

import numpy as np

from fedlora.strategies.base import Aggregate, SiteUpdate, State, add_delta, weighted_mean
from fedlora.strategies.factors import lora_layers
from fedlora.strategies.folding import FoldingStrategy


class FLoRA(FoldingStrategy):
    name = "flora"
    summary = "stack the site adapters into the base; restart the adapter (exact; any ranks)"

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        state = add_delta(global_state, weighted_mean(updates))
        for a, b in lora_layers(global_state).values():
            state[a], state[b] = global_state[a].copy(), np.zeros_like(global_state[b])
        return Aggregate(state, folded=self.residuals(global_state, updates, state))
