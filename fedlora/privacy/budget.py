"""A site's privacy budget, and where its privacy state lives.

The run configuration proposes (epsilon, delta); the site's own node
configuration may impose a stricter one, and the stricter wins: a coordinator
cannot loosen a hospital's budget. Delta is bounded by the site even when its
node config says nothing: never above the site's default (`SITE_DELTA`, 1e-5)
nor above 1/(10·units) of its own data, so a coordinator cannot weaken a
site's epsilon by proposing a large delta; it is rounded down to a power of
ten, so the delta a site reports says nothing precise about its size. A node config that sets any
`privacy-*` key also makes DP-SGD mandatory at that site, even if the run
disables it.

Node-config keys (deployment: `flower-supernode --node-config '...'`):
  privacy-epsilon      the site's largest acceptable epsilon
  privacy-delta        the site's largest acceptable delta (default: SITE_DELTA)
  privacy-unit-column  the site's unit-of-privacy column (e.g. "patient-id")
  privacy-epsilon-per-run  the most epsilon one run may spend at this site
  privacy-per-run      refuse (default): calibrate sigma to fit the share, refuse a
                       run whose fixed sigma would not; warn: train and warn loudly
  state-dir            folder on the site's persistent disk for its ledger
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

NODE_EPSILON = "privacy-epsilon"
NODE_DELTA = "privacy-delta"
NODE_UNIT_COLUMN = "privacy-unit-column"
NODE_EPSILON_PER_RUN = "privacy-epsilon-per-run"
NODE_PER_RUN = "privacy-per-run"
NODE_STATE_DIR = "state-dir"
NODE_PRIVACY_KEYS = (NODE_EPSILON, NODE_DELTA, NODE_UNIT_COLUMN, NODE_EPSILON_PER_RUN)
SITE_DELTA = 1e-5  # the largest delta a site accepts when its node config names none


class PrivacyStateError(RuntimeError):
    """The site cannot keep its privacy state (no folder to persist the ledger in)."""


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float
    source: str   # which configuration set each value, for the ledger and the report


@dataclass(frozen=True)
class RunShare:
    """The most epsilon one run may spend at a site, and what the site does about a run that would
    spend more: refuse it (and calibrate sigma to fit), or train and warn."""
    epsilon: float
    refuse: bool

    @property
    def action(self) -> str:
        return "refuse" if self.refuse else "warn"


def run_share(node: Mapping[str, Any]) -> RunShare | None:
    """The site's per-run share from its node config, if it sets one."""
    if NODE_EPSILON_PER_RUN not in node:
        if NODE_PER_RUN in node:
            raise ValueError(f"node config {NODE_PER_RUN} needs {NODE_EPSILON_PER_RUN}")
        return None
    action = str(node.get(NODE_PER_RUN, "refuse"))
    if action not in ("refuse", "warn"):
        raise ValueError(f"node config {NODE_PER_RUN}: {action!r} is not refuse or warn")
    return RunShare(positive(node, NODE_EPSILON_PER_RUN), action == "refuse")


def positive(node: Mapping[str, Any], key: str) -> float:
    try:
        value = float(node[key])
    except (TypeError, ValueError):
        raise ValueError(f"node config {key}: {node[key]!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"node config {key}: {value} must be > 0")
    return value


def resolve_budget(run_epsilon: float, run_delta: float, node: Mapping[str, Any], units: int | None = None) -> Budget:
    """The stricter of the run's and the site's (epsilon, delta), per component. The site's delta is
    its node config's, else SITE_DELTA, and never above 1/(10·units) of its own data."""
    eps, eps_src = run_epsilon, "run config"
    if NODE_EPSILON in node and positive(node, NODE_EPSILON) < eps:
        eps, eps_src = positive(node, NODE_EPSILON), "node config"
    candidates = [(run_delta, "run config"),
                  (positive(node, NODE_DELTA), "node config") if NODE_DELTA in node else (SITE_DELTA, "site default")]
    if units:
        candidates.append((0.1 / units, f"1/(10 x {units} units)"))
    delta, delta_src = min(candidates, key=lambda c: c[0])
    rounded = power_of_ten_below(delta)
    if rounded != delta:  # the site reports delta: 1/(10 units) to the digit would give its size away
        delta, delta_src = rounded, f"{delta_src}, rounded down to a power of ten"
    return Budget(eps, delta, f"epsilon: {eps_src}, delta: {delta_src}")


def power_of_ten_below(value: float) -> float:
    """The largest power of ten not above `value` (> 0)."""
    exponent = math.floor(math.log10(value) + 1e-9)
    return float(f"1e{exponent}")


def dp_required(enabled_by_run: bool, node: Mapping[str, Any]) -> bool:
    """DP-SGD runs when the run enables it or the site's own configuration asks for it."""
    return enabled_by_run or any(key in node for key in NODE_PRIVACY_KEYS)


def unit_column(run_column: str, node: Mapping[str, Any]) -> str:
    """The site knows its data: its own unit column, when set, wins."""
    return str(node.get(NODE_UNIT_COLUMN, run_column) or "")


def state_dir(node: Mapping[str, Any], output_dir: str, site: str, simulated: bool) -> Path:
    """Where the site keeps its ledger: the node's `state-dir`, or in a simulation
    `<output.dir>/sites/<site>/`. A deployed site without a state-dir cannot keep a
    budget across restarts, so it refuses (fail closed)."""
    if node.get(NODE_STATE_DIR):
        return Path(str(node[NODE_STATE_DIR])).expanduser()
    if simulated and output_dir:
        return Path(output_dir).expanduser() / "sites" / site
    raise PrivacyStateError(
        f"site {site}: differential privacy needs a folder on the site's persistent disk for its "
        f"privacy ledger; set node config {NODE_STATE_DIR}=\"/path\"")
