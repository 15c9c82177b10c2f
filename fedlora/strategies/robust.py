"""Common ground of the robust aggregators (median, trimmed mean, Krum).

They compare the sites' updates coordinate by coordinate or as whole vectors,
so they need each individual update (no secure aggregation) and their
sensitivity to one site is not that of a sum (no client-level DP as
implemented). Sites of a smaller rank would be zero-padded, and those zeros
would vote for "no change" (median) or look like outliers (Krum), so every
site must train at lora.rank. Weights are ignored: one site, one vote.
"""

from __future__ import annotations

import numpy as np

from fedlora.strategies.base import SiteUpdate, State, Strategy


class RobustStrategy(Strategy):
    linear = False
    needs = "each site's own update, to compare it with the others"
    client_dp = False
    heterogeneous_ranks = False
    rank_note = "zero-padded components would count as votes for no change, or as outliers"


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
