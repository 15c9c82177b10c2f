"""The protocol parameters a fedlora run asks for (its `[secagg]` section)."""

from __future__ import annotations

from .config import MIN_CLIENTS, SecAggConfig


def session_config(run_config) -> SecAggConfig:
    """SecAggConfig from a RunConfig; 0 in threshold/degree means the protocol's default.

    At least federation.min-sites inputs must be in every sum (and never fewer than 3).
    """
    s, fed = run_config.secagg, run_config.federation
    return SecAggConfig(
        threshold=s.threshold or None,
        degree=s.degree or None,
        clip_range=float(s.clip_range),
        bytes_per_param=int(s.bytes_per_param),
        min_survivors=max(MIN_CLIENTS, fed.min_sites),
        allow_weak_threshold=bool(s.allow_weak_threshold),
    )
