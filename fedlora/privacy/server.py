"""The coordinator's record of the sites' privacy, as the round pipeline (server/pipeline.py) keeps it.

- Sites report only an epsilon summary; the coordinator keeps the latest per
  site, writes the largest as `epsilon` (and `delta`) in metrics.jsonl and all
  of them in summary.json.
- A site that refuses a round for lack of budget answers with an error reply
  (code `wire.BUDGET_EXHAUSTED`): it is logged, not asked to train again, and
  the run goes on with the others; when fewer than federation.min-sites remain,
  the run ends cleanly with what it has. The refusals are part of the
  coordinator's checkpoint, so a resumed run does not ask those sites again.

- The last ledger head (MAC) each site reported is kept in a file that outlives
  the run (privacy.ledger-heads) and sent back with the site's next train
  message (`anchor`): the site refuses if its ledger no longer holds it, so a
  ledger rewritten at the site, even with its key, is caught.

Client-level DP, which the coordinator applies itself, is a strategy wrapper
(client_dp.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from fedlora import wire
from fedlora.locks import exclusive

log = logging.getLogger(__name__)


def is_budget_refusal(reply) -> bool:
    return reply.has_error() and reply.error.code == wire.BUDGET_EXHAUSTED


class ServerPrivacy:
    def __init__(self, config):
        self.config = config
        self.sites: dict[str, dict[str, Any]] = {}   # site -> its latest privacy report
        self.exhausted: dict[int, str] = {}           # node id -> the site's refusal
        self.stopped: str | None = None               # why the run ended early, if it did
        self.forecast: dict[str, dict[str, float]] = {}  # site -> its answer to the pre-run forecast
        self.heads_path = ledger_heads_path(config)
        self.heads: dict[str, dict[str, Any]] = (      # node id -> the last ledger head it reported
            json.loads(self.heads_path.read_text()) if self.heads_path and self.heads_path.exists() else {})

    # -- which sites can still train ----------------------------------------------
    def eligible(self, nodes: list[int]) -> list[int]:
        """The connected nodes that have not run out of budget."""
        return [n for n in nodes if n not in self.exhausted]

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
    def anchor(self, node_id: int, site: str | None = None) -> str:
        """The ledger head this node last reported ("" if none): its ledger must still hold it. A site
        known by name that now connects as another node (a new key, a new SuperLink database) is held
        to the head it reported before."""
        if str(node_id) in self.heads:
            return str(self.heads[str(node_id)]["head"])
        earlier = [h for h in self.heads.values() if site and h.get("site") == site]
        if earlier:
            log.warning("site %s connects as node %d, not as the node it reported its ledger head from; it is "
                        "checked against that head", site, node_id)
            return str(max(earlier, key=lambda h: h.get("time", 0))["head"])
        return ""

    def observe(self, site: str, reply, server_round: int) -> None:
        metrics = reply.content[wire.METRICS]
        if wire.DP_EPSILON not in metrics:
            return
        record = reply.content.config_records.get(wire.PRIVACY, {})
        if record.get(wire.DP_LEDGER_HEAD):
            self._record_head(reply.metadata.src_node_id, site, str(record[wire.DP_LEDGER_HEAD]), server_round)
        self.sites[site] = {
            "epsilon": float(metrics[wire.DP_EPSILON]),
            "epsilon_rdp": float(metrics[wire.DP_EPSILON_RDP]),
            "delta": float(metrics[wire.DP_DELTA]),
            "budget_epsilon": float(metrics[wire.DP_BUDGET_EPSILON]),
            # Under secure aggregation a site keeps these (they would give its record count away).
            "noise_multiplier": float(metrics.get(wire.DP_NOISE_MULTIPLIER, float("nan"))),
            "sample_rate": float(metrics.get(wire.DP_SAMPLE_RATE, float("nan"))),
            "unit": str(record.get(wire.DP_UNIT, "")),
            "ledger_head": str(record.get(wire.DP_LEDGER_HEAD, "")),
            "last_round": server_round,
        }

    def _record_head(self, node_id: int, site: str, head: str, server_round: int) -> None:
        record = {"head": head, "site": site, "round": server_round, "run": str(self.config.output.dir),
                  "time": time.time()}
        self.heads[str(node_id)] = record
        if self.heads_path is None:
            return
        self.heads_path.parent.mkdir(parents=True, exist_ok=True)
        # Runs of one coordinator share the file: re-read and write it under a lock, so none loses another's.
        with exclusive(self.heads_path.with_suffix(".lock")):
            on_disk = json.loads(self.heads_path.read_text()) if self.heads_path.exists() else {}
            self.heads = {**on_disk, str(node_id): record}
            tmp = self.heads_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.heads, indent=1, sort_keys=True))
            os.replace(tmp, self.heads_path)

    # -- what the run directory shows ----------------------------------------------
    def row(self) -> dict[str, Any]:
        """Columns for this round's metrics row."""
        out: dict[str, Any] = {}
        if self.sites:
            out["epsilon"] = max(s["epsilon"] for s in self.sites.values())
            out["delta"] = max(s["delta"] for s in self.sites.values())
            out["epsilon_per_site"] = {site: s["epsilon"] for site, s in sorted(self.sites.items())}
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
        if self.forecast:
            out["forecast"] = self.forecast
        if self.stopped:
            out["stopped"] = self.stopped
        return finite(out)

    def state_dict(self) -> dict[str, Any]:
        return {"sites": self.sites, "exhausted": {str(node): why for node, why in self.exhausted.items()},
                "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sites = dict(state["sites"])
        self.exhausted = {int(node): why for node, why in state["exhausted"].items()}
        self.stopped = state["stopped"]


def ledger_heads_path(config) -> Path | None:
    if config.privacy.ledger_heads:
        return Path(config.privacy.ledger_heads).expanduser()
    return Path(config.output.dir).expanduser() / "ledger-heads.json" if config.output.dir else None


def finite(tree: Any) -> Any:
    """JSON has no infinity: an unbounded epsilon is written as null."""
    if isinstance(tree, dict):
        return {k: finite(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree
