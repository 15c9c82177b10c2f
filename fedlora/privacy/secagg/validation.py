"""Checks of the `[secagg]` section, called from `config._semantic_problems`.

Which strategies can run under secure aggregation (only linear ones) is checked
with the other strategy combinations in `fedlora.strategies.compat`.
"""

from __future__ import annotations

import math

from .config import MIN_CLIENTS
from .errors import SecAggConfigError
from .faults import parse_dropouts
from .session import session_config


def secagg_problems(c) -> list[str]:
    """Every problem with `c.secagg`, one message per problem, naming the key."""
    s = c.secagg
    p: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    need(s.threshold == 0 or s.threshold >= 2, f"secagg.threshold: {s.threshold} must be 0 (default) or >= 2")
    need(s.degree == 0 or s.degree >= 2, f"secagg.degree: {s.degree} must be 0 (default) or >= 2")
    need(math.isfinite(s.clip_range) and s.clip_range > 0, f"secagg.clip-range: {s.clip_range} must be > 0")
    need(s.bytes_per_param in (1, 2, 3, 4), f"secagg.bytes-per-param: {s.bytes_per_param} must be 1, 2, 3 or 4")
    need(math.isfinite(s.max_weight) and s.max_weight > 0, f"secagg.max-weight: {s.max_weight} must be > 0")
    need(s.stage_timeout > 0, f"secagg.stage-timeout: {s.stage_timeout} must be > 0")
    need(s.dp_noise_multiplier >= 0, f"secagg.dp-noise-multiplier: {s.dp_noise_multiplier} must be >= 0 (0: off)")
    need(s.dp_clip > 0, f"secagg.dp-clip: {s.dp_clip} must be > 0")
    need(0 < s.dp_delta < 1, f"secagg.dp-delta: {s.dp_delta} not in (0, 1)")
    try:
        dropouts = parse_dropouts(s.simulate_dropouts)
    except ValueError as err:
        p.append(f"secagg.simulate-dropouts: {err}")
        dropouts = []
    bad = sorted({d.site for d in dropouts if d.site >= c.federation.num_sites})
    need(not bad, f"secagg.simulate-dropouts: site(s) {bad} not in 0..{c.federation.num_sites - 1}")
    if not s.enabled:
        need(not dropouts and s.dp_noise_multiplier == 0,
             "secagg.simulate-dropouts / dp-noise-multiplier: only apply with secagg.enabled = true")
        return p

    fed = c.federation
    why = "with two sites, each learns the other's update from the sum"
    need(fed.num_sites >= MIN_CLIENTS, f"secagg.enabled: needs federation.num-sites >= {MIN_CLIENTS} "
                                       f"({why}); got {fed.num_sites}")
    need(fed.min_sites >= MIN_CLIENTS, f"secagg.enabled: needs federation.min-sites >= {MIN_CLIENTS} "
                                       f"({why}); got {fed.min_sites}")
    sampled = max(1, math.ceil(fed.fraction_train * fed.num_sites))
    if fed.num_sites >= MIN_CLIENTS:
        need(sampled >= MIN_CLIENTS, f"federation.fraction-train: {fed.fraction_train} samples {sampled} of "
                                     f"{fed.num_sites} sites per round; secure aggregation needs >= {MIN_CLIENTS}")
    if not p and sampled >= MIN_CLIENTS:
        try:  # the protocol's own parameter checks, for the simulated federation's round size
            session_config(c).resolve(sampled)
        except SecAggConfigError as err:
            p.append(f"secagg: {err} (for {sampled} sites per round)")
    need(not c.privacy.client_dp,
         "privacy.client-dp: the coordinator cannot clip updates it never sees under secure aggregation; "
         "use secagg.dp-noise-multiplier (distributed DP: each site clips and noises before masking)")
    if s.dp_noise_multiplier > 0:
        need(s.dp_clip <= s.clip_range, f"secagg.dp-clip: {s.dp_clip} exceeds secagg.clip-range {s.clip_range}: "
                                        "clipped updates must fit the fixed-point range")
    return p
