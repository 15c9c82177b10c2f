"""Simulated poisoning ATTACKS, for testing robust aggregation only.

`simulation.attack` makes the simulated sites listed in `simulation.attack-sites`
misbehave: `flip-labels` trains on wrong labels (label k -> k + 1 mod K), and
`scale-update` multiplies the update the site sends by `simulation.attack-scale`.
Only simulated sites (those with a Flower `partition-id`) ever attack; a
deployed site ignores these keys. Every attacking message is logged as a warning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


def _indices(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def attack_problems(config) -> list[str]:
    sim = config.simulation
    if sim.attack == "none":
        return []
    try:
        sites = _indices(sim.attack_sites)
    except ValueError:
        return [f"simulation.attack-sites: {sim.attack_sites!r} is not a comma-separated list of site indices"]
    problems = []
    if not sites:
        problems.append("simulation.attack-sites: name at least one attacking site")
    bad = [i for i in sites if not 0 <= i < config.federation.num_sites]
    if bad:
        problems.append(f"simulation.attack-sites: {bad} not in 0..{config.federation.num_sites - 1}")
    if sim.attack == "flip-labels" and config.task.type != "classification":
        problems.append("simulation.attack = flip-labels needs task.type = classification")
    if getattr(getattr(config, "privacy", None), "enabled", False):
        problems.append("simulation.attack: attacks are simulated on the non-private training path only "
                        "(privacy.enabled = false)")
    if not math.isfinite(sim.attack_scale):
        problems.append(f"simulation.attack-scale: {sim.attack_scale} must be finite")
    return problems


@dataclass(frozen=True)
class Attack:
    kind: str
    scale: float
    site: str

    def examples(self, examples: list[dict], num_labels: int) -> list[dict]:
        if self.kind != "flip-labels":
            return examples
        log.warning("ATTACK (simulation): site %s trains on flipped labels", self.site)
        return [{**e, "label": (e["label"] + 1) % num_labels} for e in examples]

    def update(self, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.kind != "scale-update":
            return delta
        log.warning("ATTACK (simulation): site %s scales its update by %g", self.site, self.scale)
        return {k: (v * self.scale).astype(v.dtype) for k, v in delta.items()}


def site_attack(config, node_config, site: str) -> Attack | None:
    """The attack this simulated site runs, or None."""
    sim = config.simulation
    if sim.attack == "none" or "partition-id" not in node_config:
        return None
    if int(node_config["partition-id"]) not in _indices(sim.attack_sites):
        return None
    return Attack(sim.attack, sim.attack_scale, site)
