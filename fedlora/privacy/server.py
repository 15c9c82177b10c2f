"""The coordinator's side of privacy, as the round loop (server/rounds.py) calls it.

- Sites report only an epsilon summary; the coordinator keeps the latest per
  site, writes the largest as `epsilon` (and `delta`) in metrics.jsonl and all
  of them in summary.json.
- A site that refuses a round for lack of budget answers with an error reply
  (code `wire.BUDGET_EXHAUSTED`): it is logged, not asked to train again, and
  the run goes on with the others; when fewer than federation.min-sites remain,
  the run ends cleanly with what it has.
- Client-level DP (privacy.client-dp): the updates are replaced by one noised
  mean before the strategy sees them (client_dp.py).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fedlora import wire
from fedlora.privacy.client_dp import ClientLevelDP, utility_warning
from fedlora.privacy.accounting import epsilon as account
from fedlora.privacy.accounting import Mechanism
from fedlora.strategies.base import SiteUpdate, State

log = logging.getLogger(__name__)

CLIENT_DP_SITE = "client-dp-mean"


def is_budget_refusal(reply) -> bool:
    return reply.has_error() and reply.error.code == wire.BUDGET_EXHAUSTED


class ServerPrivacy:
    def __init__(self, config):
        self.config = config
        self.sites: dict[str, dict[str, Any]] = {}   # site -> its latest privacy report
        self.exhausted: dict[int, str] = {}           # node id -> the site's refusal
        self.stopped: str | None = None               # why the run ended early, if it did
        self.available = 0
        self.client_dp = ClientLevelDP.from_config(config.privacy) if config.privacy.client_dp else None
        self._warned = False

    # -- which sites can still train ----------------------------------------------
    def eligible(self, nodes: list[int]) -> list[int]:
        """The connected nodes that have not run out of budget."""
        out = [n for n in nodes if n not in self.exhausted]
        self.available = len(out)
        return out

    def refused(self, node_id: int, reason: str) -> None:
        self.exhausted[node_id] = reason
        log.warning("site out of privacy budget (node %d), not asked to train again: %s", node_id, reason)

    def stop(self, why: str) -> bool:
        """Whether a shortage of sites is the sites' budgets running out (then the run
        ends cleanly), recording why."""
        if not self.exhausted:
            return False
        self.stopped = f"{why}; {len(self.exhausted)} site(s) out of privacy budget"
        log.warning("ending the run: %s", self.stopped)
        return True

    # -- site reports -------------------------------------------------------------
    def observe(self, site: str, reply, server_round: int) -> None:
        metrics = reply.content[wire.METRICS]
        if wire.DP_EPSILON not in metrics:
            return
        record = reply.content.config_records.get(wire.PRIVACY, {})
        self.sites[site] = {
            "epsilon": float(metrics[wire.DP_EPSILON]),
            "epsilon_rdp": float(metrics[wire.DP_EPSILON_RDP]),
            "delta": float(metrics[wire.DP_DELTA]),
            "budget_epsilon": float(metrics[wire.DP_BUDGET_EPSILON]),
            "noise_multiplier": float(metrics[wire.DP_NOISE_MULTIPLIER]),
            "sample_rate": float(metrics[wire.DP_SAMPLE_RATE]),
            "unit": str(record.get(wire.DP_UNIT, "")),
            "ledger_head": str(record.get(wire.DP_LEDGER_HEAD, "")),
            "last_round": server_round,
        }

    # -- client-level DP ----------------------------------------------------------
    def before_aggregate(self, updates: list[SiteUpdate], sampled: int, server_round: int) -> list[SiteUpdate]:
        """Unchanged without client-level DP; else one update: the noised mean of the
        clipped updates over the `sampled` sites asked this round, every site weighing 1."""
        if self.client_dp is None or not updates:
            return updates
        like = updates[0].delta
        for u in updates[1:]:
            if u.delta.keys() != like.keys() or any(u.delta[k].shape != v.shape for k, v in like.items()):
                raise ValueError(f"client-level DP: site {u.site} sent tensors of other shapes than "
                                 f"{updates[0].site}; all sites must send the same tensors")
        if not self._warned:
            self._warn(like, sampled)
        result = self.client_dp.round([u.delta for u in updates], like, sampled, max(self.available, sampled))
        log.info("round %d client-level DP: clip %.4g (%d of %d updates within it), epsilon %.3f",
                 server_round, result.clip_norm, result.unclipped, len(updates),
                 self.client_dp.spent()["epsilon"])
        return [SiteUpdate(CLIENT_DP_SITE, float(sampled), result.delta_mean, {wire.NUM_EXAMPLES: sampled})]

    def _warn(self, like: State, sampled: int) -> None:
        self._warned = True
        dp, rounds = self.client_dp, self.config.federation.rounds
        q = sampled / max(self.available, sampled)
        eps = account([Mechanism(dp.noise_multiplier, q, rounds)], dp.delta, dp.accountant)
        dimension = sum(int(v.size) for v in like.values())
        log.warning("%s", utility_warning(dp.noise_multiplier, dp.clip_norm, sampled, dimension, eps, dp.delta,
                                          rounds))

    # -- what the run directory shows ----------------------------------------------
    def row(self) -> dict[str, Any]:
        """Columns for this round's metrics row."""
        out: dict[str, Any] = {}
        if self.sites:
            out["epsilon"] = max(s["epsilon"] for s in self.sites.values())
            out["delta"] = max(s["delta"] for s in self.sites.values())
            out["epsilon_per_site"] = {site: s["epsilon"] for site, s in sorted(self.sites.items())}
        if self.client_dp is not None:
            spent = self.client_dp.spent()
            out["client_epsilon"] = spent["epsilon"]
            out["client_delta"] = spent["delta"]
            out["client_clip_norm"] = self.client_dp.clip_norm
        if self.exhausted:
            out["sites_out_of_budget"] = len(self.exhausted)
        return out

    def summary(self) -> dict[str, Any]:
        p = self.config.privacy
        out: dict[str, Any] = {"site_level": {
            "enabled": p.enabled or bool(self.sites),
            "unit": sorted({s["unit"] for s in self.sites.values()}) or [p.unit_column or "record"],
            "accountant": p.accountant,
            "epsilon": max((s["epsilon"] for s in self.sites.values()), default=None),
            "delta": max((s["delta"] for s in self.sites.values()), default=None),
            "sites": self.sites,
            "out_of_budget": sorted(self.exhausted.values()),
        }}
        if self.client_dp is not None:
            spent = self.client_dp.spent()
            out["client_level"] = {"unit": "site", "clipping": p.client_clipping,
                                   "noise_multiplier": self.client_dp.noise_multiplier,
                                   "clip_norm": self.client_dp.clip_norm, **spent}
        if self.stopped:
            out["stopped"] = self.stopped
        return _finite(out)

    def state_dict(self) -> dict[str, Any]:
        return {"sites": self.sites,
                "client_dp": self.client_dp.state_dict() if self.client_dp is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sites = dict(state.get("sites", {}))
        if self.client_dp is not None and state.get("client_dp"):
            self.client_dp.load_state_dict(state["client_dp"])


def _finite(tree: Any) -> Any:
    """JSON has no infinity: an unbounded epsilon is written as null."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree
