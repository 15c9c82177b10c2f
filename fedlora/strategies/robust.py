"""Common ground of the robust aggregators (median, trimmed mean, Krum).

They compare the sites' updates coordinate by coordinate or as whole vectors,
so they need each individual update (no secure aggregation) and their
sensitivity to one site is not that of a sum (no client-level DP as
implemented). They work per factor coordinate (A's and B's entries), not on
B·A. Every site must train at lora.rank: a component a smaller-rank site never
held has no value of its own there, and a robust rule needs several sites'
values per coordinate to outvote a bad one. Counting the others as "no change"
would freeze a component that fewer than half the sites hold (a median of one
change and three zeros), and leaving them out would give a single holder the
whole say (ranks 8, 4, 4, 2: components 5-8 have one). Weights are ignored:
one site, one vote.
"""

from __future__ import annotations

import numpy as np

from fedlora.strategies.base import SiteUpdate, State, Strategy


class RobustStrategy(Strategy):
    linear = False
    needs = "each site's own update, to compare it with the others"
    client_dp = False
    heterogeneous_ranks = False
    rank_note = ("a component held by few sites cannot be aggregated robustly: counting the others as "
                 "'no change' freezes it, leaving them out gives one site the whole say")


def stack(updates: list[SiteUpdate], keys: list[str]) -> np.ndarray:
    """n × P matrix: each site's update flattened over `keys`, in that order."""
    return np.stack([np.concatenate([u.delta[k].astype(np.float64).ravel() for k in keys]) for u in updates])


def unstack(vector: np.ndarray, like: State, keys: list[str]) -> State:
    """The inverse of one row of `stack`, as float32 tensors shaped like `like`."""
    out, start = {}, 0
    for k in keys:
        size = like[k].size
        out[k] = vector[start:start + size].reshape(like[k].shape).astype(np.float32)
        start += size
    return out
