"""TEST ONLY: make a site send a broken update, to test that the coordinator rejects it.

`relay_app` is the deployed relay ClientApp (fedlora.deploy.relay) plus fault
injection: a site whose node config sets `test-fault` corrupts its own train
reply in the listed rounds, after the ClientApp has produced it, as a buggy or
malicious site would. The coordinator must reject such an update with a
logged reason and aggregate the others (fedlora.arrays.check_update). The
production relay never imports this module; a test submits a run with it:

    python -m fedlora.simulations.faults run --dir COORDINATOR --out RUN [--set ...]

takes the arguments of `fedlora run` and submits the same run with this
ClientApp (the loopback federation's `run_command(..., faulty=True)`).

    test-fault = "nan@1,shape@3"      kind@round, comma-separated

Kinds: nan, inf (a non-finite value), extra-key, missing-key (wrong tensors),
shape (a tensor of the wrong shape), norm (an update of absurd norm).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Mapping

import numpy as np
from flwr.app import Context, Message

from fedlora import wire
from fedlora.arrays import from_record, to_record
from fedlora.deploy import cli as deploy_cli
from fedlora.deploy.relay import RelayClientApp, server_round

log = logging.getLogger(__name__)

NODE_KEY = "test-fault"
RELAY_APP = "fedlora.simulations.faults:relay_app"
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
