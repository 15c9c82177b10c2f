"""FedAvgM: server momentum on the adapter pseudo-gradient.

Hsu et al., 2019. The pseudo-gradient is the weighted mean update Δ (FedIT's,
factor by factor); the server keeps a velocity v ← β·v + Δ and moves the
adapter by η·v. Depends only on Σ wᵢ Δᵢ, so it works under secure aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.options import Problems, Section, option
from fedlora.strategies.base import Aggregate, SiteUpdate, State, Strategy, weighted_mean


def momentum_step(velocity: State, grad: State, beta: float) -> State:
    """v ← β·v + Δ (v starts at zero)."""
    return {k: (beta * velocity[k] + g if k in velocity else g).astype(np.float32) for k, g in grad.items()}


@dataclass
class FedAvgMParams(Section):
    NAME = "strategy.fedavgm"
    server_lr: float = option(1.0, "Server learning rate eta: the adapter moves by eta * velocity.")
    momentum: float = option(0.9, "Server momentum beta: velocity <- beta * velocity + mean update.")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.server_lr > 0, f"{self.NAME}.server-lr: {self.server_lr} must be > 0")
        p.need(0 <= self.momentum < 1, f"{self.NAME}.momentum: {self.momentum} not in [0, 1)")
        return p


class FedAvgM(Strategy):
    name = "fedavgm"
    summary = "server momentum on the mean update"
    params = FedAvgMParams

    def __init__(self, params: FedAvgMParams | None = None, **common):
        super().__init__(params, **common)
        self.velocity: State = {}

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        self.velocity = momentum_step(self.velocity, weighted_mean(updates), self.p.momentum)
        return Aggregate({k: (x + self.p.server_lr * self.velocity[k]).astype(np.float32)
                          for k, x in global_state.items()})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "velocity": dict(self.velocity)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.velocity = {k: np.asarray(v, dtype=np.float32) for k, v in state.pop("velocity", {}).items()}
        super().load_state_dict(state)
