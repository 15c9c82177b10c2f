"""Common ground of the strategies that fold a residual into the frozen base weights.

FLoRA and FedEx-LoRA are exact because whatever the new global adapter cannot
express of Σ wᵢ scale·Bᵢ·Aᵢ is added to the sites' frozen weights instead. They
need each site's own factors, so they are not linear in the uploads (no secure
aggregation) and there is no bounded-sensitivity sum to noise (no client-level DP).
"""

from __future__ import annotations

import numpy as np

from fedlora.strategies.base import SiteUpdate, State, Strategy
from fedlora.strategies.correction import BaseCorrection, residual_factors
from fedlora.strategies.factors import lora_layers, normalized


class FoldingStrategy(Strategy):
    linear = False
    needs = "each site's own factors Bᵢ and Aᵢ, to form Σ wᵢ Bᵢ·Aᵢ"
    exact = True
    client_dp = False
    folds_into_base = True
    rank_note = "each site's factors are stacked at its own rank"

    def __init__(self, params=None, **common):
        super().__init__(params, **common)
        self.correction = BaseCorrection()

    def residuals(self, global_state: State, updates: list[SiteUpdate],
                  new_state: State) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{layer: (U, V)} with U·V = scale·(Σ wᵢ Bᵢ·Aᵢ − B'·A'), each site at its own rank."""
        weights = normalized(u.weight for u in updates)
        out = {}
        for layer, (a, b) in lora_layers(global_state).items():
            locals_ = [site_factors(global_state, u, a, b) for u in updates]
            out[layer] = residual_factors(locals_, weights, new_state[a], new_state[b], self.lora_scale)
        return out


def site_factors(global_state: State, update: SiteUpdate, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """A site's local (A, B) for one layer, cut back to the rank it trained at."""
    rank = update.rank or global_state[a].shape[0]
    return (global_state[a] + update.delta[a])[:rank], (global_state[b] + update.delta[b])[:, :rank]
