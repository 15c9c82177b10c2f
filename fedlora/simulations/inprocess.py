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
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedlora import config as cfg

log = logging.getLogger(__name__)
RUN_ID = 1


def _transmit(message: Message) -> Message:
    """The message as the other side receives it: serialized and parsed again."""
    return message_from_proto(message_to_proto(message))


@dataclass
class Exchange:
    """One batch of messages pushed (one stage): what each site spent and what crossed the wire."""

    message_types: set[str] = field(default_factory=set)
    site_seconds: list[float] = field(default_factory=list)
    bytes_down: int = 0   # serialized records, all messages of the batch
    bytes_up: int = 0     # serialized records, all replies


def _size(content: RecordDict) -> int:
    """Serialized bytes of a message's records (robust where Flower's count_bytes is not:
    an empty list in a ConfigRecord, which Flower's own legacy SecAgg+ sends)."""
    return recorddict_to_proto(content).ByteSize()


class InProcessGrid(Grid):
    """A Grid over `num_sites` simulated sites (partition ids 0..n-1) served by `client_app`."""

    def __init__(self, client_app, run_config: dict, num_sites: int, seed: int = 0, clock=time.perf_counter):
        # Message() reads the sender's identity from this process-wide object (the coordinator's here).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SUPERLINK_NODE_ID, 1
        self.client_app = client_app
        self.clock = clock  # of the sites' time in Exchange (benchmarks pass time.process_time)
        rng = random.Random(seed)
        ids: list[int] = []
        while len(ids) < num_sites:  # 64-bit ids like Flower's, so id handling is exercised
            node = rng.getrandbits(64)
            if node not in ids and node != SUPERLINK_NODE_ID:
                ids.append(node)
        self.contexts = {
            node: Context(run_id=RUN_ID, node_id=node, node_config={"partition-id": i, "num-partitions": num_sites},
                          state=RecordDict(), run_config=dict(run_config))
            for i, node in enumerate(ids)
        }
        self._replies: dict[str, Message] = {}
        self._run = None
        self.exchanges: list[Exchange] = []  # one per push (send_and_receive), for benchmarks

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run or Run.create_empty(RUN_ID)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids, exchange = [], Exchange()
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[message.metadata.message_id] = self._deliver(message, exchange)
            ids.append(message.metadata.message_id)
        self.exchanges.append(exchange)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    def _deliver(self, message: Message, exchange: Exchange) -> Message:
        received = _transmit(message)
        exchange.message_types.add(received.metadata.message_type)
        exchange.bytes_down += _size(received.content)
        context = self.contexts[received.metadata.dst_node_id]
        started = self.clock()
        try:
            reply = self.client_app(received, context)
        except Exception as err:  # what a SuperNode does: the coordinator gets an error reply
            log.warning("site %d raised %s: %s", context.node_config["partition-id"], type(err).__name__, err)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                            reply_to=received)
        exchange.site_seconds.append(self.clock() - started)
        if reply.has_content():
            exchange.bytes_up += _size(reply.content)
        return _transmit(reply)


def run_inprocess(config: cfg.RunConfig, out: str | Path, seed: int = 0) -> Path:
    """A whole fedlora run (ServerApp main) over an InProcessGrid; returns the run directory."""
    from fedlora.client.app import app as client_app
    from fedlora.server.app import main
    from fedlora.simulations.launcher import infer_labels

    out = Path(out).expanduser().resolve()
    config = infer_labels(cfg.from_nested(config.to_nested(), {"output.dir": str(out)}))
    flat = config.to_flat()
    grid = InProcessGrid(client_app, flat, config.federation.num_sites, seed)
    main(grid, Context(run_id=RUN_ID, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=flat))
    return out
