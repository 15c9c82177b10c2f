"""A site's own side of distributed DP under secure aggregation: its floor, its budget, its ledger.

The coordinator configures distributed DP (secagg.dp-noise-multiplier σ, the
clip norm, the threshold), and the coordinator is who it protects against, so
a site does not take its word: before it trains for a masked round it checks
σ against its own floor (node config `secagg-dp-min-noise`), projects its own
site-level epsilon with this round and refuses if that would pass its own
budget (node config `secagg-dp-epsilon`, else the run's privacy.epsilon; delta:
its `privacy-delta`, else 1e-5), and records the round in its ledger — the
same hash-chained file as DP-SGD's, event `distributed-dp` — in one
transaction, before anything leaves.

What it counts: every round it contributed a noised update to, whether or not
the coordinator went on to reveal the sum (it cannot know), as one Gaussian
release of multiplier σ: composed exactly as mu-GDP. That assumes at least
`threshold` honest sites' noise in any revealed sum, which the protocol
enforces (a site unmasks only then); colluding sites, who know their own
noise, are not covered (docs/threat-model.md).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from fedlora.privacy.budget import NODE_DELTA, SITE_DELTA, positive, power_of_ten_below
from fedlora.privacy.ledger import Ledger
from fedlora.privacy.secagg.distributed_dp import epsilon_of_releases
from fedlora.privacy.site import BudgetExhausted

EVENT = "distributed-dp"
NODE_MIN_NOISE = "secagg-dp-min-noise"   # node config: the smallest sigma the site accepts
NODE_EPSILON = "secagg-dp-epsilon"       # node config: the site's budget for site-level distributed DP


def site_accounts(secagg, node: Mapping[str, Any]) -> bool:
    """Whether the site checks and records distributed DP in a run with these [secagg] settings: the run
    adds distributed-DP noise, or the site's own node config demands a floor."""
    return secagg.dp_noise_multiplier > 0 or NODE_MIN_NOISE in node


def _limits(node: Mapping[str, Any], run_epsilon: float) -> tuple[float, float, float]:
    """The site's (floor, budget, delta) for distributed DP, from its node config."""
    floor = positive(node, NODE_MIN_NOISE) if NODE_MIN_NOISE in node else 0.0
    budget = positive(node, NODE_EPSILON) if NODE_EPSILON in node else run_epsilon
    delta = power_of_ten_below(min(positive(node, NODE_DELTA), SITE_DELTA)) if NODE_DELTA in node else SITE_DELTA
    return floor, budget, delta


def _releases(ledger: Ledger) -> list[float]:
    return [e["noise_multiplier"] for e in ledger.entries() if e["event"] == EVENT]


def reserve_release(folder: str | Path, node: Mapping[str, Any], run_epsilon: float, site: str,
                    server_round: int, noise_multiplier: float, clip: float, threshold: int,
                    run: str = "") -> dict[str, Any]:
    """Check this round against the site's floor and budget and record it, or raise BudgetExhausted."""
    floor, budget, delta = _limits(node, run_epsilon)
    if noise_multiplier < floor:
        raise BudgetExhausted(f"site {site} refuses round {server_round}: the run's distributed-DP noise "
                              f"multiplier {noise_multiplier:g} is below this site's floor {floor:g} "
                              f"(node config {NODE_MIN_NOISE})")
    ledger = Ledger(folder)
    with ledger.transaction():
        sigmas = _releases(ledger)
        projected = epsilon_of_releases([*sigmas, noise_multiplier], delta)
        if not projected <= budget:
            what = f"{projected:.3f}" if math.isfinite(projected) else "an unbounded epsilon"
            raise BudgetExhausted(
                f"site {site} refuses round {server_round}: its distributed-DP budget epsilon {budget:g} (delta "
                f"{delta:g}) would be exceeded: {len(sigmas) + 1} releases at sigma {noise_multiplier:g} give {what}")
        return ledger.append({"event": EVENT, "site": site, "run": run, "round": server_round,
                              "noise_multiplier": noise_multiplier, "clip": clip, "threshold": threshold,
                              "epsilon": projected, "delta": delta, "budget_epsilon": budget,
                              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def forecast_releases(folder: str | Path, node: Mapping[str, Any], run_epsilon: float, noise_multiplier: float,
                      rounds: int) -> dict[str, float]:
    """What `rounds` more masked rounds at `noise_multiplier` would cost the site (it writes nothing):
    its budget, its epsilon before and after, and the first of those rounds it would refuse (0: none)."""
    floor, budget, delta = _limits(node, run_epsilon)
    sigmas = _releases(Ledger(folder, read_only=True))
    spent = epsilon_of_releases(sigmas, delta) if sigmas else 0.0
    refuses_at, trained = 0, rounds
    if noise_multiplier < floor:
        refuses_at, trained = 1, 0
    else:
        for r in range(1, rounds + 1):
            if not epsilon_of_releases([*sigmas, *[noise_multiplier] * r], delta) <= budget:
                refuses_at, trained = r, r - 1
                break
    after = epsilon_of_releases([*sigmas, *[noise_multiplier] * trained], delta) if sigmas or trained else 0.0
    return {"budget_epsilon": budget, "delta": delta, "spent_epsilon": spent, "after_epsilon": after,
            "refuses_at": refuses_at}
