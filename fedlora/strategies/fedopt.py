"""Adaptive server optimizers on the adapter pseudo-gradient (FedOpt).

Reddi et al., 2021, "Adaptive Federated Optimization". With Δ the weighted mean
update (FedIT's, factor by factor):

    m ← β₁·m + (1 − β₁)·Δ
    v ← second moment (FedAdam, FedYogi, FedAdagrad differ only here)
    x ← x + η·m / (√v + τ)

with m₀ = 0 and v₀ = τ² as in the paper (no bias correction). Each variant is
its own file; they depend only on Σ wᵢ Δᵢ, so they work under secure aggregation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlora.strategies.base import Aggregate, SiteUpdate, State, Strategy, weighted_mean

DEFAULT_SERVER_LR = 0.01


def adaptive_step(x: State, m: State, v: State, grad: State, *, lr: float, beta1: float, tau: float,
                  second_moment) -> tuple[State, State, State]:
    """One FedOpt step: (new x, new m, new v), all float64 arithmetic, float32 results."""
    new_x, new_m, new_v = {}, {}, {}
    for k, g in grad.items():
        g = g.astype(np.float64)
        mk = beta1 * m.get(k, 0.0) + (1 - beta1) * g
        vk = second_moment(v[k] if k in v else np.full_like(g, tau * tau), g * g)
        new_x[k] = (x[k] + lr * mk / (np.sqrt(vk) + tau)).astype(np.float32)
        new_m[k], new_v[k] = mk.astype(np.float32), vk.astype(np.float32)
    return new_x, new_m, new_v


class AdaptiveServerOptimizer(Strategy):
    """FedOpt: subclasses define `second_moment(v, g²)`."""

    def __init__(self, server_lr: float = DEFAULT_SERVER_LR, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, **common):
        super().__init__(**common)
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: State = {}
        self.v: State = {}

    @classmethod
    def from_config(cls, config):
        s = config.strategy
        return cls(server_lr=s.server_lr or DEFAULT_SERVER_LR, beta1=s.beta1, beta2=s.beta2, tau=s.tau,
                   **cls.common_options(config))

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        new_x, self.m, self.v = adaptive_step(global_state, self.m, self.v, weighted_mean(updates),
                                              lr=self.server_lr, beta1=self.beta1, tau=self.tau,
                                              second_moment=self.second_moment)
        return Aggregate(new_x)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.m = {k: np.asarray(a, dtype=np.float32) for k, a in state.pop("m", {}).items()}
        self.v = {k: np.asarray(a, dtype=np.float32) for k, a in state.pop("v", {}).items()}
        super().load_state_dict(state)
