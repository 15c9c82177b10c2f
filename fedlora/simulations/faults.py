"""TEST ONLY: sites that misbehave, and the ClientApps that let them.

The production ClientApp (fedlora.client.app) and relay (fedlora.deploy.relay)
never import this module. Tests and benchmarks that need a misbehaving site use
the apps below instead, which add mods to the same handlers:

- `test-fault` (node config): a site corrupts its own train reply in the listed
  rounds, after the ClientApp produced it, as a buggy or malicious site would.
  The coordinator must reject such an update with a logged reason and aggregate
  the others (fedlora.arrays.check_update).

      test-fault = "nan@1,shape@3"      kind@round, comma-separated

  Kinds: nan, inf (a non-finite value), extra-key, missing-key (wrong tensors),
  shape (a tensor of the wrong shape), norm (an update of absurd norm).
- `simulation.secagg-dropouts`: a simulated site fails at a secure-aggregation
  stage, to show dropouts are recovered (or, below the threshold, that the
  round fails cleanly).
- `simulation.attack`: poisoning attacks (attacks.py).

`app` is the simulation's ClientApp with all of them (`fedlora simulate` and
the in-process grid take it when the configuration asks for one);
`relay_app` is the deployed relay with `test-fault`. A deployment test submits
a run with it through

    python -m fedlora.simulations.faults run --dir COORDINATOR --out RUN [--set ...]

which takes the arguments of `fedlora run` (the loopback federation's
`run_command(..., faulty=True)`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Mapping

import numpy as np
from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedlora import wire
from fedlora.arrays import from_record, to_record
from fedlora.client.app import SITE_MODS, build_client_app
from fedlora.client.runtime import site_config
from fedlora.client.secure import stage_of
from fedlora.deploy import cli as deploy_cli
from fedlora.deploy.relay import RelayClientApp, server_round
from fedlora.simulations.attacks import attack_mod, attacked_runtime

log = logging.getLogger(__name__)

NODE_KEY = "test-fault"
APP = "fedlora.simulations.faults:app"
RELAY_APP = "fedlora.simulations.faults:relay_app"
SIMULATED_DROPOUT = 4101  # error code of a reply from simulation.secagg-dropouts
KINDS = ("nan", "inf", "extra-key", "missing-key", "shape", "norm")


def parse(spec: str) -> dict[int, str]:
    """{round: kind} from "kind@round,..."; raises ValueError naming the bad item."""
    faults: dict[int, str] = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        kind, sep, round_text = item.partition("@")
        if not sep or kind not in KINDS or not round_text.isdigit():
            raise ValueError(f"node config {NODE_KEY}: {item!r} is not kind@round with kind in {', '.join(KINDS)}")
        faults[int(round_text)] = kind
    return faults


def corrupt(state: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    state = {k: v.copy() for k, v in state.items()}
    first = sorted(state)[0]
    if kind == "nan":
        state[first].flat[0] = np.nan
    elif kind == "inf":
        state[first].flat[0] = np.inf
    elif kind == "extra-key":
        state["base_model.injected.weight"] = np.zeros(4, dtype=np.float32)
    elif kind == "missing-key":
        del state[first]
    elif kind == "shape":
        state[first] = np.zeros(state[first].size + 1, dtype=state[first].dtype)
    elif kind == "norm":
        state[first] = state[first] + np.float32(1e9)
    return state


def maybe_corrupt(reply: Message, server_round: int, node_config: Mapping[str, Any]) -> Message:
    """The train reply, corrupted in place when the node config asks for it this round."""
    spec = str(node_config.get(NODE_KEY, ""))
    if not spec or reply.has_error() or not reply.metadata.message_type.startswith("train"):
        return reply
    if wire.ARRAYS not in reply.content.array_records:
        return reply
    kind = parse(spec).get(server_round)
    if kind:
        log.warning("TEST FAULT INJECTION (%s): sending a corrupted update (%s) in round %d",
                    NODE_KEY, kind, server_round)
        reply.content[wire.ARRAYS] = to_record(corrupt(from_record(reply.content[wire.ARRAYS]), kind))
    return reply



def corrupt_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    return maybe_corrupt(call_next(msg, context), server_round(msg), context.node_config)


def dropout_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """simulation.secagg-dropouts: this simulated site fails at the listed stage and round."""
    stage, node = stage_of(msg), context.node_config
    if stage is None or "partition-id" not in node:
        return call_next(msg, context)
    site, this_round = int(node["partition-id"]), server_round(msg)
    if any(s == site and st == stage and r in (None, this_round) for s, st, r in site_config(context).simulation.dropouts()):
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


class FaultyRelay(RelayClientApp):
    """The deployed relay ClientApp, whose train replies a `test-fault` node config corrupts."""

    def __call__(self, message: Message, context: Context) -> Message:
        reply = super().__call__(message, context)
        return maybe_corrupt(reply, server_round(message), context.node_config)


relay_app = FaultyRelay()


def main(argv: list[str] | None = None) -> int:
    """`fedlora run`, submitting the run with `relay_app` as the sites' ClientApp."""
    parser = argparse.ArgumentParser(prog="python -m fedlora.simulations.faults")
    deploy_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    if args.command != "run":
        parser.error("only `run` submits with fault injection")
    return deploy_cli.run_command(args, clientapp=RELAY_APP)


if __name__ == "__main__":
    sys.exit(main())
