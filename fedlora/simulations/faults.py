"""TEST ONLY: a site that sends a broken update, to test that the coordinator rejects it.

A site whose node config sets `test-fault` corrupts its own train reply in the
listed rounds, after its ClientApp produced it, as a buggy or malicious site
would. The coordinator must reject such an update with a logged reason and
aggregate the others (fedlora.arrays.check_update).

    test-fault = "nan@1,shape@3"      kind@round, comma-separated

Kinds: nan, inf (a non-finite value), extra-key, missing-key (wrong tensors),
shape (a tensor of the wrong shape), norm (an update of absurd norm).

`corrupt_mod` does it in a simulated site's ClientApp (misbehaving.py);
`relay_app` is the deployed relay ClientApp (fedlora.deploy.relay) that does
it, which the production relay never imports. This module stays as light as
the relay (no torch): Flower starts a ClientApp process for every message.
A deployment test submits a run with `relay_app` through the loopback
harness (`python -m fedlora.simulations.loopback run ...`).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedlora import wire
from fedlora.arrays import from_record, to_record
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


def corrupt_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A simulated site's train reply, corrupted when its node config asks for it this round."""
    return maybe_corrupt(call_next(msg, context), server_round(msg), context.node_config)


class FaultyRelay(RelayClientApp):
    """The deployed relay ClientApp, whose train replies a `test-fault` node config corrupts."""

    def __call__(self, message: Message, context: Context) -> Message:
        reply = super().__call__(message, context)
        return maybe_corrupt(reply, server_round(message), context.node_config)


relay_app = FaultyRelay()
