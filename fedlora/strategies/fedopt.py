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

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.options import Problems, Section, option
from fedlora.strategies.base import Aggregate, SiteUpdate, State, Strategy, weighted_mean


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


@dataclass
class FedOptParams(Section):
    """The parameters every FedOpt variant has; FedAdam and FedYogi add beta2."""

    NAME = "strategy.fedopt"
    server_lr: float = option(0.01, "Server learning rate eta.")
    beta1: float = option(0.9, "First-moment decay beta1.")
    tau: float = option(1e-3, "Adaptivity tau (added to sqrt(v); v starts at tau^2).")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.server_lr > 0, f"{self.NAME}.server-lr: {self.server_lr} must be > 0")
        for key in ("beta1", "beta2"):
            if hasattr(self, key):
                value = getattr(self, key)
                p.need(0 <= value < 1, f"{self.NAME}.{key}: {value} not in [0, 1)")
        p.need(self.tau > 0, f"{self.NAME}.tau: {self.tau} must be > 0")
        return p


@dataclass
class SecondMomentParams(FedOptParams):
    beta2: float = option(0.99, "Second-moment decay beta2.")


class AdaptiveServerOptimizer(Strategy):
    """FedOpt: subclasses define `second_moment(v, g²)` and their parameters."""

    def __init__(self, params: FedOptParams | None = None, **common):
        super().__init__(params, **common)
        self.m: State = {}
        self.v: State = {}

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        new_x, self.m, self.v = adaptive_step(global_state, self.m, self.v, weighted_mean(updates),
                                              lr=self.p.server_lr, beta1=self.p.beta1, tau=self.p.tau,
                                              second_moment=self.second_moment)
        return Aggregate(new_x)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.m = {k: np.asarray(a, dtype=np.float32) for k, a in state.pop("m", {}).items()}
        self.v = {k: np.asarray(a, dtype=np.float32) for k, a in state.pop("v", {}).items()}
        super().load_state_dict(state)
