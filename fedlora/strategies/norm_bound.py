"""Update-norm bounding: shrink any site's update whose L2 norm exceeds a bound.

A broken or malicious site that scales its update up cannot then outweigh the
others. The bound is absolute (`strategy.norm-bound`) or relative to the
round's median update norm (`strategy.norm-bound-relative`), which needs no
knowledge of the update scale. `NormBounded` wraps any strategy and bounds each
update as sent, before the strategy's arithmetic, so it needs individual
updates (not available under secure aggregation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedlora.strategies.base import SiteUpdate, State, Strategy, StrategyWrapper


def update_norm(delta: State) -> float:
    return float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in delta.values())))


def bound_norms(deltas: list[State], bound: float) -> tuple[list[State], list[bool]]:
    """Each delta scaled by min(1, bound / ‖delta‖); and which ones were scaled."""
    out, clipped = [], []
    for delta in deltas:
        norm = update_norm(delta)
        factor = bound / norm if norm > bound else 1.0
        out.append({k: (v * factor).astype(v.dtype) for k, v in delta.items()} if factor < 1.0 else delta)
        clipped.append(factor < 1.0)
    return out, clipped


@dataclass(frozen=True)
class NormBound:
    absolute: float = 0.0   # > 0: L2 bound on one update
    relative: float = 0.0   # > 0: bound = this × the round's median update norm

    @classmethod
    def from_config(cls, config) -> "NormBound":
        return cls(config.strategy.norm_bound, config.strategy.norm_bound_relative)

    @property
    def active(self) -> bool:
        return self.absolute > 0 or self.relative > 0

    def bound_for(self, deltas: list[State]) -> float:
        if self.absolute > 0:
            return self.absolute
        return self.relative * float(np.median([update_norm(d) for d in deltas]))

    def apply(self, deltas: list[State]) -> tuple[list[State], list[bool]]:
        if not self.active:
            return deltas, [False] * len(deltas)
        return bound_norms(deltas, self.bound_for(deltas))


class NormBounded(StrategyWrapper):
    """Bounds each site's update norm, then lets the wrapped strategy aggregate."""

    needs_individual = "the coordinator cannot bound the norm of an update it never sees"

    def __init__(self, inner: Strategy, bound: NormBound):
        super().__init__(inner)
        self.bound = bound
        self.clipped: list[str] = []

    def aggregate(self, global_state: State, updates: list[SiteUpdate]) -> State:
        bounded, clipped = self.bound.apply([u.delta for u in updates])
        self.clipped = [u.site for u, c in zip(updates, clipped) if c]
        return self.inner.aggregate(global_state, [replace(u, delta=d) for u, d in zip(updates, bounded)])

    def round_metrics(self) -> dict[str, Any]:
        return {**self.inner.round_metrics(), "updates_clipped": list(self.clipped)}
