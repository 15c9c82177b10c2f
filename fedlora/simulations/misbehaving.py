"""TEST ONLY: the ClientApp of simulated sites that misbehave.

The production ClientApp (fedlora.client.app) never imports this module. A
simulated run that asks for misbehaving sites — a poisoning attack
(`simulation.attack`, attacks.py), a secure-aggregation dropout
(`simulation.secagg-dropouts`), or a corrupted update (node config
`test-fault`, faults.py) — runs `app` instead, which is the same train and
evaluate handlers with more mods; `fedlora simulate` and the in-process grid
pick it themselves (`misbehaves`).
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedlora.client.app import SITE_MODS, build_client_app
from fedlora.client.runtime import site_config
from fedlora.client.secure import stage_of
from fedlora.deploy.relay import server_round
from fedlora.simulations.attacks import attack_mod, attacked_runtime
from fedlora.simulations.faults import corrupt_mod

log = logging.getLogger(__name__)

APP = "fedlora.simulations.misbehaving:app"
SIMULATED_DROPOUT = 4101  # error code of a reply from simulation.secagg-dropouts


def dropout_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """simulation.secagg-dropouts: this simulated site fails at the listed stage and round."""
    stage, node = stage_of(msg), context.node_config
    if stage is None or "partition-id" not in node:
        return call_next(msg, context)
    site, this_round = int(node["partition-id"]), server_round(msg)
    dropouts = site_config(context).simulation.dropouts()
    if any(s == site and st == stage and r in (None, this_round) for s, st, r in dropouts):
        log.warning("SIMULATED DROPOUT (simulation.secagg-dropouts): site %d fails at %s in round %d",
                    site, stage, this_round)
        return Message(Error(code=SIMULATED_DROPOUT, reason=f"simulated dropout at {stage}"), reply_to=msg)
    return call_next(msg, context)


# Outermost first: a dropout never reaches the rest; corruption hits the reply as sent; the attack
# scales the handler's own update before it is encoded or masked.
app = build_client_app(runtime=attacked_runtime, mods=[dropout_mod, corrupt_mod, *SITE_MODS, attack_mod])


def misbehaves(config) -> bool:
    """Whether a simulated run asks for misbehaving sites (then its sites run `app`)."""
    return config.simulation.attack != "none" or bool(config.simulation.secagg_dropouts)
