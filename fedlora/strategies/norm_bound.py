"""Update-norm bounding: shrink any site's update whose L2 norm exceeds a bound.

A broken or malicious site that scales its update up cannot then outweigh the
others. The bound is absolute (`strategy.norm-bound`) or relative to the
round's median update norm (`strategy.norm-bound-relative`), which needs no
knowledge of the update scale. It is applied by the coordinator to each
update as sent, before any strategy's arithmetic, so it needs individual
updates (not available under secure aggregation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

State = dict[str, np.ndarray]


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
