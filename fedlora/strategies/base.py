"""The seam every aggregation strategy plugs into.

The round loop only ever calls these methods, so a new algorithm is a new file
that subclasses `Strategy`; the arithmetic stays in pure functions that tests
call without Flower.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

State = dict[str, np.ndarray]  # adapter tensor name -> values


@dataclass
class SiteUpdate:
    """What one site sent back for a round: its update relative to the global adapter."""

    site: str
    weight: float
    delta: State
    metrics: dict[str, Any] = field(default_factory=dict)


class Strategy(ABC):
    """Turns the global adapter and the sites' updates into the next global adapter."""

    name: str = "base"
    #: True when the new global adapter depends only on the weighted sum of the
    #: updates, which is all secure aggregation reveals.
    linear: bool = True

    @classmethod
    def from_config(cls, config) -> "Strategy":
        """Build from a RunConfig; strategies with parameters read their [strategy] keys."""
        return cls()

    def client_config(self, server_round: int) -> dict[str, Any]:
        """Extra instructions the sites receive this round (e.g. a proximal term)."""
        return {}

    @abstractmethod
    def aggregate(self, global_state: State, updates: list[SiteUpdate]) -> State:
        """The next global adapter."""

    def state_dict(self) -> dict[str, Any]:
        """Everything a restarted server needs to continue exactly (optimizer moments...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, got keys {sorted(state)}")


def weighted_mean(updates: list[SiteUpdate]) -> State:
    """Σ wᵢ Δᵢ / Σ wᵢ, tensor by tensor (float64 accumulation, float32 result)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    total = float(sum(u.weight for u in updates))
    if total <= 0:
        raise ValueError("aggregation weights sum to zero")
    keys = updates[0].delta.keys()
    for u in updates[1:]:
        if u.delta.keys() != keys:
            raise ValueError(f"site {u.site} sent tensors {sorted(u.delta)} != {sorted(keys)}")
    return {
        k: (sum(u.weight * u.delta[k].astype(np.float64) for u in updates) / total).astype(np.float32)
        for k in keys
    }
