"""In-process driver: every stage of a round, with only the payloads passed around.

For tests and benchmarks. Each client is a separate ``SecAggClient`` rebuilt
from its ``state_dict()`` before every stage (as a fresh Flower ClientApp
process would be), every payload is type-checked against what Flower records
can carry and copied, so no object is shared between parties.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Collection, Mapping

import numpy as np

from . import messages as m
from .client import SecAggClient
from .config import SecAggConfig
from .server import SecAggResult, SecAggServer

# tamper(stage, node_id, "request" | "reply", payload) -> payload: the network.
Tamper = Callable[[str, int, str, dict[str, Any]], dict[str, Any]]


def run_in_memory(
    vectors: Mapping[int, np.ndarray],
    threshold: int | None = None,
    *,
    config: SecAggConfig | None = None,
    dropouts_after_advertise: Collection[int] = (),
    dropouts_after_keys: Collection[int] = (),
    dropouts_after_masking: Collection[int] = (),
    tamper: Tamper | None = None,
    session_id: bytes | None = None,
    graph_seed: bytes | None = None,
    timings: dict[str, list[float]] | None = None,
) -> SecAggResult:
    """Securely sum ``vectors`` ({node_id: 1-D float array}) through all four stages.

    ``dropouts_after_advertise``: clients that send keys, then vanish.
    ``dropouts_after_keys``: clients that send their encrypted shares, then vanish
    (their pairwise masks must be rebuilt). ``dropouts_after_masking``: clients
    that upload, then do not help unmask (their input still counts).
    ``timings``, if given, collects seconds per stage under "client-<stage>"
    (one entry per client) and "server-<stage>".
    """
    config = config or SecAggConfig()
    if threshold is not None:
        config = dataclasses.replace(config, threshold=threshold)
    server = SecAggServer(list(vectors), config, session_id=session_id, graph_seed=graph_seed)
    states = {i: _wire(SecAggClient(i).state_dict()) for i in vectors}
    gone: set[int] = set()

    def clock(key: str, start: float) -> None:
        if timings is not None:
            timings.setdefault(key, []).append(time.perf_counter() - start)

    def exchange(stage: str, requests: Mapping[int, dict], leaving: Collection[int]) -> dict[int, dict]:
        replies = {}
        for i, request in requests.items():
            if i in gone:
                continue
            request = _deliver(tamper, stage, i, "request", request)
            client = SecAggClient.from_state_dict(states[i])
            start = time.perf_counter()
            if stage == m.SETUP:
                reply = client.advertise_keys(request, config.allow_weak_threshold)
            elif stage == m.SHARE_KEYS:
                reply = client.share_keys(request)
            elif stage == m.MASKED_INPUT:
                reply = client.masked_input(request, vectors[i])
            else:
                reply = client.unmask(request)
            clock(f"client-{stage}", start)
            states[i] = _wire(client.state_dict())
            replies[i] = _deliver(tamper, stage, i, "reply", reply)
        gone.update(leaving)  # they answered this stage, and no later one
        return replies

    start = time.perf_counter()
    requests = server.setup_requests()
    clock(f"server-{m.SETUP}", start)
    stages = [
        (m.SETUP, server.share_keys_requests, dropouts_after_advertise),
        (m.SHARE_KEYS, server.masked_input_requests, dropouts_after_keys),
        (m.MASKED_INPUT, server.unmask_requests, dropouts_after_masking),
        (m.UNMASK, server.aggregate, ()),
    ]
    result: Any = requests
    for stage, next_step, leaving in stages:
        replies = exchange(stage, result, leaving)
        start = time.perf_counter()
        result = next_step(replies)  # the next requests; the SecAggResult at the end
        clock(f"server-{stage}", start)
    return result


def _deliver(tamper: Tamper | None, stage: str, node: int, direction: str, payload: dict) -> dict:
    payload = _wire(payload)
    return _wire(tamper(stage, node, direction, payload)) if tamper else payload


def _wire(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Type-check against Flower record types and copy (arrays and lists included)."""
    m.check_wire_types(payload)
    return {
        k: v.copy() if isinstance(v, np.ndarray) else list(v) if isinstance(v, list) else v
        for k, v in payload.items()
    }
