"""FedAvgM: server momentum on the adapter pseudo-gradient.

Hsu et al., 2019. The pseudo-gradient is the weighted mean update Δ (FedIT's,
factor by factor); the server keeps a velocity v ← β·v + Δ and moves the
adapter by η·v. Depends only on Σ wᵢ Δᵢ, so it works under secure aggregation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlora.strategies.base import Aggregate, SiteUpdate, State, Strategy, weighted_mean


def momentum_step(velocity: State, grad: State, beta: float) -> State:
    """v ← β·v + Δ (v starts at zero)."""
    return {k: (beta * velocity[k] + g if k in velocity else g).astype(np.float32) for k, g in grad.items()}


class FedAvgM(Strategy):
    name = "fedavgm"
    summary = "server momentum on the mean update"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, **common):
        super().__init__(**common)
        self.server_lr, self.momentum = server_lr, momentum
        self.velocity: State = {}

    @classmethod
    def from_config(cls, config) -> "FedAvgM":
        s = config.strategy
        return cls(server_lr=s.server_lr or 1.0, momentum=s.server_momentum, **cls.common_options(config))

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        self.velocity = momentum_step(self.velocity, weighted_mean(updates), self.momentum)
        return Aggregate({k: (x + self.server_lr * self.velocity[k]).astype(np.float32)
                          for k, x in global_state.items()})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "velocity": dict(self.velocity)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.velocity = {k: np.asarray(v, dtype=np.float32) for k, v in state.pop("velocity", {}).items()}
        super().load_state_dict(state)
