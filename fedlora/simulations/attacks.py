"""Simulated poisoning ATTACKS, for testing robust aggregation only.

`simulation.attack` makes the simulated sites listed in `simulation.attack-sites`
misbehave: `flip-labels` trains on wrong labels (label k -> k + 1 mod K), and
`scale-update` multiplies the update the site sends by `simulation.attack-scale`.
Only simulated sites (those with a Flower `partition-id`) ever attack. Every
attacking message is logged as a warning.

Both act through the seams of the site's ClientApp, which never imports this
module (fedlora.simulations.misbehaving builds the simulation's ClientApp with them):
`attacked_runtime` hands the train handler the attacker's flipped rows, and
`attack_mod` scales the update of the handler's reply, before any other mod
encodes or masks it. Both work with or without DP-SGD.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedlora import wire
from fedlora.arrays import from_record, to_record
from fedlora.client.runtime import SiteRuntime, site_config, site_runtime

log = logging.getLogger(__name__)


def _attacks(context: Context) -> str | None:
    """The attack this node runs, or None (a deployed site, or not among attack-sites)."""
    sim = site_config(context).simulation
    if sim.attack == "none" or "partition-id" not in context.node_config:
        return None
    return sim.attack if int(context.node_config["partition-id"]) in sim.attack_sites else None


def flip_labels(examples: list[dict], num_labels: int) -> list[dict]:
    return [{**e, "label": (e["label"] + 1) % num_labels} for e in examples]


def scale_update(delta: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    return {k: (v * scale).astype(v.dtype) for k, v in delta.items()}


_FLIPPED: dict[int, SiteRuntime] = {}  # id(runtime) -> the same runtime with flipped training rows


def attacked_runtime(context: Context) -> SiteRuntime:
    """The site's runtime; a flip-labels attacker's training rows carry the next label."""
    rt = site_runtime(context)
    if _attacks(context) != "flip-labels":
        return rt
    if id(rt) not in _FLIPPED:
        log.warning("ATTACK (simulation): site %s trains on flipped labels", rt.data.name)
        _FLIPPED[id(rt)] = dataclasses.replace(rt, train_examples=flip_labels(rt.train_examples,
                                                                              rt.task.num_labels))
    return _FLIPPED[id(rt)]


def attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A scale-update attacker's train reply carries its update times simulation.attack-scale."""
    reply = call_next(msg, context)
    if _attacks(context) != "scale-update" or reply.has_error() or wire.ARRAYS not in reply.content.array_records:
        return reply
    scale = site_config(context).simulation.attack_scale
    log.warning("ATTACK (simulation): site %s scales its update by %g", context.node_config["partition-id"], scale)
    reply.content[wire.ARRAYS] = to_record(scale_update(from_record(reply.content[wire.ARRAYS]), scale))
    return reply
