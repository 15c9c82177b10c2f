"""Collecting a round's training replies: what the coordinator gets of the sites' updates.

Collection is the one pluggable step of the round pipeline (pipeline.py):

- `PlainCollector`: one train message per sampled site; each site's update, as
  sent, goes to the strategy (which may decode, check or reject it);
- `SecureCollector` (secure_collect.py): the secure-aggregation protocol's
  stages; the strategy gets only the weighted sum of the updates, as one update.

Both return a `Collected`: the updates the strategy accepted, the sites whose
updates they hold, every site's train reply (for its clear metadata: name,
timings, privacy report; a site that trained spent its budget even when its
update is rejected), what crossed the wire, why sites are missing, and the
collector's columns of the round's metrics row. `Messenger` is the wire they
share with the evaluation step: send, receive, count bytes, note refusals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora import flower, wire
from fedlora.arrays import State, from_record, payload_bytes
from fedlora.privacy.server import ServerPrivacy, is_budget_refusal
from fedlora.strategies.base import SiteUpdate

log = logging.getLogger(__name__)

Accept = Callable[[SiteUpdate, State], "tuple[SiteUpdate, str | None]"]


@dataclass
class Traffic:
    bytes_up: int = 0     # serialized records of every reply
    bytes_down: int = 0   # serialized records of every message


@dataclass
class Collected:
    updates: list[SiteUpdate]            # each site's update, or (secure) one update: their weighted mean
    contributors: list[str]              # the sites whose updates are in `updates`
    reports: list[Message]               # every train reply received, for its clear metadata
    traffic: Traffic
    failures: list[str] = field(default_factory=list)  # one line per missing or rejected site
    row: dict[str, Any] = field(default_factory=dict)  # the collector's columns for metrics.jsonl
    failed: str | None = None            # the round could not finish; the global adapter stays
    individual: bool = True              # False: `updates` is one sum, no site's own update


class Messenger:
    """The coordinator's side of the wire."""

    def __init__(self, grid: Grid, privacy: ServerPrivacy):
        self.grid = grid
        self.privacy = privacy
        self.names: dict[int, str] = {}  # node id -> site name, learned from replies
        self.silent: set[int] = set()    # sites that let a deadline pass this round (the pipeline clears it)
        self._looked_up: set[int] = set()

    def name(self, node: int) -> str:
        if node not in self.names and node not in self._looked_up:
            self._learn_registered_names()
            self._looked_up.add(node)
        return self.names.get(node, f"node-{node}")

    def _learn_registered_names(self) -> None:
        """The names sites were registered under (deployment), for sites that have not replied yet. One
        listing answers for every node it lists, named or not: a node is looked up once, not once each
        (10,000 simulated sites, none named, would otherwise list the federation 10,000 times)."""
        try:
            nodes = list(self.grid.get_nodes())
        except Exception as err:  # noqa: BLE001 - a name is not worth failing a round for: node-<id> stands
            log.debug("could not read the sites' registered names: %s", err)
            return
        for info in nodes:
            self._looked_up.add(int(info.node_id))
            if getattr(info, "name", ""):
                self.names.setdefault(int(info.node_id), str(info.name))

    def send(self, messages: list[Message], timeout: float, traffic: Traffic, what: str,
             server_round: int, errors: dict[int, int] | None = None) -> tuple[list[Message], list[str]]:
        """The usable replies to `messages`, and one line per site that failed, refused or did not reply
        (and, into `errors`, each error reply's code by node). Waiting ends at `timeout`, a reply's data
        included: a site that dies mid-upload is a site that did not reply, and the round goes on."""
        for message in messages:
            self._add_anchor(message)
        traffic.bytes_down += sum(payload_bytes(m.content) for m in messages)
        received = flower.send_and_receive(self.grid, messages, timeout)
        # The SuperLink answers for a site it knows is gone ("Node Unavailable"): by the message's destination.
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        replies, failures, answered = [], [], set()
        for reply in received:
            if flower.message_unavailable(reply):  # made by the grid: its data never arrived in time
                continue
            node = reply.metadata.src_node_id
            if node == flower.SERVER_NODE_ID:
                node = destination.get(reply.metadata.reply_to_message_id, node)
                self.silent.add(node)  # offline: not asked again this round
            answered.add(node)
            if reply.has_error():
                if errors is not None:
                    errors[node] = reply.error.code
                if is_budget_refusal(reply):
                    self.privacy.refused(node, reply.error.reason)
                failures.append(f"{self.name(node)}: {reply.error.reason}")
                continue
            traffic.bytes_up += payload_bytes(reply.content)
            if wire.SITE in reply.content.config_records:
                self.names[node] = str(reply.content[wire.SITE][wire.SITE_NAME])
            replies.append(reply)
        missing = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered]
        if missing:
            self.silent.update(missing)
            failures.append(f"{len(missing)} site(s) sent no complete reply within {timeout:.0f}s: "
                            f"{', '.join(self.name(n) for n in missing)}")
        for failure in failures:
            log.warning("round %d %s: %s", server_round, what, failure)
        return replies, failures

    def _add_anchor(self, message: Message) -> None:
        """A train or forecast message carries the last ledger head its site reported (the site checks it)."""
        if message.metadata.message_type not in (MessageType.TRAIN, MessageType.QUERY):
            return
        node = message.metadata.dst_node_id
        anchor = self.privacy.anchor(node, self.names.get(node))
        if anchor and wire.CONFIG in message.content:
            message.content[wire.CONFIG] = ConfigRecord({**message.content[wire.CONFIG], wire.LEDGER_ANCHOR: anchor})


def site_name(reply: Message) -> str:
    return str(reply.content[wire.SITE][wire.SITE_NAME])


def train_columns(updates: list[SiteUpdate]) -> dict[str, Any]:
    """train_loss (weighted over the sites; absent under DP-SGD, where sites keep it) and
    train_seconds (the slowest site)."""
    losses = [(u.weight, u.metrics[wire.TRAIN_LOSS]) for u in updates if wire.TRAIN_LOSS in u.metrics]
    out: dict[str, Any] = {}
    if losses:
        out["train_loss"] = sum(w * x for w, x in losses) / sum(w for w, _ in losses)
    out["train_seconds"] = max(float(u.metrics[wire.TRAIN_SECONDS]) for u in updates) if updates else 0.0
    return out


class PlainCollector:
    """Each sampled site's update, as sent."""

    def __init__(self, messenger: Messenger, round_timeout: float):
        self.messenger = messenger
        self.round_timeout = round_timeout

    def collect(self, nodes: list[int], records: dict[str, Any], global_state: State, server_round: int,
                accept: Accept) -> Collected:
        traffic = Traffic()
        messages = [Message(RecordDict(dict(records)), dst_node_id=node, message_type=MessageType.TRAIN)
                    for node in nodes]
        replies, failures = self.messenger.send(messages, self.round_timeout, traffic, MessageType.TRAIN,
                                                server_round)
        updates = []
        for reply in replies:
            metrics = dict(reply.content[wire.METRICS])
            sent = SiteUpdate(site_name(reply), float(metrics.get(wire.NUM_EXAMPLES, 0)),
                              from_record(reply.content[wire.ARRAYS]), metrics)
            update, problem = accept(sent, global_state)  # decoded, checked: tensors, shapes, rank
            if problem is None and update.weight <= 0:
                problem = f"non-positive weight {update.weight}"
            if problem:
                log.warning("round %d: rejected the update of %s: %s", server_round, update.site, problem)
                failures.append(f"{update.site}: {problem}")
                continue
            updates.append(update)
        row = {**train_columns(updates), "sites": len(updates), "rejected": len(failures)}
        return Collected(updates, [u.site for u in updates], replies, traffic, failures, row)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"the plain collector keeps no state {sorted(state)}")
