"""The real ServerApp and ClientApp in one process, for fast tests and benchmarks.

`InProcessGrid` is a Flower `Grid` whose sites are the fedlora ClientApp called
in this process, each with its own Context (node id, node config, state).
Every message and reply crosses Flower's protobuf serialization, so only
serialized records pass between the coordinator and a site, as on the
Simulation Engine. What it lacks: separate processes, sites running in
parallel, a network and timeouts (sites answer one after the other).
`fedlora simulate` (launcher.py) is the real engine; use this where a test or
a benchmark needs many runs.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedlora import config as cfg
from fedlora import flower
from fedlora.client.app import app as site_app
from fedlora.server.app import main
from fedlora.simulations import misbehaving
from fedlora.simulations.prepare import prepare

log = logging.getLogger(__name__)
RUN_ID = 1


@dataclass
class Exchange:
    """One batch of messages pushed (one stage): what each site spent and what crossed the wire."""

    message_types: set[str] = field(default_factory=set)
    site_seconds: list[float] = field(default_factory=list)
    bytes_down: int = 0   # serialized records, all messages of the batch
    bytes_up: int = 0     # serialized records, all replies


class InProcessGrid(Grid):
    """A Grid over `num_sites` simulated sites (partition ids 0..n-1) served by `client_app`, or,
    with `node_configs`, over sites with those node configs (e.g. a deployed site's `data-path`)."""

    def __init__(self, client_app, run_config: dict, num_sites: int, seed: int = 0, clock=time.perf_counter,
                 node_configs: list[dict] | None = None):
        # Message() reads the sender's identity from this process-wide object (the coordinator's here).
        flower.set_task_identity(RUN_ID, flower.SERVER_NODE_ID, 1)
        self.client_app = client_app
        self.clock = clock  # of the sites' time in Exchange (benchmarks pass time.process_time)
        rng = random.Random(seed)
        ids: list[int] = []
        while len(ids) < num_sites:  # 64-bit ids like Flower's, so id handling is exercised
            node = rng.getrandbits(64)
            if node not in ids and node != flower.SERVER_NODE_ID:
                ids.append(node)
        nodes = node_configs or [{"partition-id": i, "num-partitions": num_sites} for i in range(num_sites)]
        self.contexts = {
            node: Context(run_id=RUN_ID, node_id=node, node_config=dict(nodes[i]), state=RecordDict(),
                          run_config=dict(run_config))
            for i, node in enumerate(ids)
        }
        self._replies: dict[str, Message] = {}
        self._run = None
        self.exchanges: list[Exchange] = []  # one per push (send_and_receive), for benchmarks

    @property
    def simulated_sites(self) -> bool:
        """Read by the ServerApp (fedlora.flower.simulated_sites): whether the sites read the run's
        data (data.path or the synthetic corpus) rather than files of their own (`data-path`)."""
        return all("data-path" not in c.node_config for c in self.contexts.values())

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run or flower.empty_run(RUN_ID)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids, exchange = [], Exchange()
        for message in messages:
            flower.set_message_id(message, str(uuid4()))
            self._replies[message.metadata.message_id] = self._deliver(message, exchange)
            ids.append(message.metadata.message_id)
        self.exchanges.append(exchange)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    def _deliver(self, message: Message, exchange: Exchange) -> Message:
        received = flower.transmit(message)
        exchange.message_types.add(received.metadata.message_type)
        exchange.bytes_down += flower.serialized_size(received.content)
        context = self.contexts[received.metadata.dst_node_id]
        started = self.clock()
        try:
            reply = self.client_app(received, context)
        except Exception as err:  # what a SuperNode does: the coordinator gets an error reply
            site = context.node_config.get("partition-id", context.node_config.get("site"))
            log.warning("site %s raised %s: %s", site, type(err).__name__, err)
            reply = Message(Error(code=flower.CLIENT_APP_RAISED, reason=f"{type(err).__name__}: {err}"),
                            reply_to=received)
        exchange.site_seconds.append(self.clock() - started)
        if reply.has_content():
            exchange.bytes_up += flower.serialized_size(reply.content)
        return flower.transmit(reply)


def run_inprocess(config: cfg.RunConfig, out: str | Path, seed: int = 0, client_app=None,
                  node_configs: list[dict] | None = None) -> Path:
    """A whole fedlora run (ServerApp main) over an InProcessGrid; returns the run directory.
    `client_app`: the sites' ClientApp (default: fedlora's, or the one with the misbehaving
    sites the configuration asks for). `node_configs`: one per site, as a deployed SuperNode's
    (`data-path`, `site`, ...), instead of simulated sites."""
    out = Path(out).expanduser().resolve()
    config = prepare(config, out)
    client_app = client_app or (misbehaving.app if misbehaving.misbehaves(config) else site_app)
    flat = config.to_flat()
    num_sites = len(node_configs) if node_configs else config.federation.num_sites
    grid = InProcessGrid(client_app, flat, num_sites, seed, node_configs=node_configs)
    main(grid, Context(run_id=RUN_ID, node_id=flower.SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config=flat))
    return out
