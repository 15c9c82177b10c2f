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
from fedlora.strategies.factors import lora_layers, normalized, state_rank


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
        """{layer: (U, V)} with U·V = scale·(Σ wᵢ ΔWᵢ/scale − B'·A'), ΔWᵢ each site's full local
        ΔW: its own factors at its rank plus the global components beyond it, which it kept."""
        weights = normalized(u.weight for u in updates)
        ranks = [u.rank or state_rank(global_state) for u in updates]
        out = {}
        for layer, (a, b) in lora_layers(global_state).items():
            locals_ = [site_factors(global_state, u, a, b) for u in updates]
            locals_.append(kept_tail(global_state[a], global_state[b], ranks, weights))
            out[layer] = residual_factors(locals_, np.append(weights, 1.0), new_state[a], new_state[b],
                                          self.lora_scale)
        return out


def kept_tail(a: np.ndarray, b: np.ndarray, ranks: list[int], weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σᵢ wᵢ·B[:, rᵢ:]·A[rᵢ:] as one stack: global component j once, its B column weighted by
    the share of the sites that never held it (rank ≤ j). Components with B = 0 (FLoRA's
    restarted adapter) add nothing and are left out, so the correction grows only by what counts."""
    share = np.array([sum(w for w, r in zip(weights, ranks) if r <= j) for j in range(a.shape[0])])
    keep = (share > 0) & np.any(b != 0, axis=0)
    return a[keep], b[:, keep] * share[keep]


def site_factors(global_state: State, update: SiteUpdate, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """A site's local (A, B) for one layer, cut back to the rank it trained at."""
    rank = update.rank or global_state[a].shape[0]
    return (global_state[a] + update.delta[a])[:rank], (global_state[b] + update.delta[b])[:, :rank]
