"""A training round under secure aggregation: the coordinator learns only the sum.

The four protocol stages (fedlora/privacy/secagg) run as four Message-API round
trips through the Grid, one `send_and_receive` each, of message types
`train.secagg_setup`, `train.secagg_share_keys`, `train.secagg_masked_input`
(which also carries the global adapter: the sites train, then upload only
their masked vector) and `train.secagg_unmask`. The revealed sum becomes one
pseudo-update, the weighted mean of the sites' updates, which the (linear)
strategy aggregates as it would the individual updates.

A site that fails or vanishes after key agreement is recovered from its
neighbours' shares while at least the threshold survive. Below that the round
fails: the failure is logged and recorded (`secagg_failed`), the global
adapter stays as it was, and the run continues with the next round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedlora import wire
from fedlora.arrays import State, payload_bytes
from fedlora.privacy.secagg import SecAggConfigError, SecAggError, SecAggServer, messages as m
from fedlora.privacy.secagg import distributed_dp
from fedlora.privacy.secagg.records import MESSAGE_TYPES, payload_of, payload_records
from fedlora.privacy.secagg.session import session_config
from fedlora.privacy.secagg.updates import LAYOUT, Layout, decode
from fedlora.privacy.server import is_budget_refusal
from fedlora.strategies.base import SiteUpdate

log = logging.getLogger(__name__)

SECURE_SITE = "secure-aggregate"  # the name of the one pseudo-update the strategy sees


@dataclass
class Traffic:
    bytes_up: int = 0
    bytes_down: int = 0


class RoundFailed(RuntimeError):
    """The round cannot finish securely; the global adapter stays unchanged."""


class SecureRounds:
    """Runs the coordinator's training rounds under secure aggregation (rounds.Coordinator.secure)."""

    def __init__(self, coordinator):
        self.coordinator = coordinator
        self.config = coordinator.config
        self.names: dict[int, str] = {}  # node id -> site name, learned from masked-input replies
        s = self.config.secagg
        self.dp = s.dp_noise_multiplier > 0
        # Released noised sums so far (distributed DP accounting); a resumed run counts its log.
        self.released = sum(1 for row in coordinator.rundir.read_metrics()
                            if row.get("sites", 0) > 0 and "secagg_failed" not in row) if self.dp else 0

    def train_round(self, nodes: list[int], global_state: State, server_round: int) -> tuple[State, dict[str, Any]]:
        traffic = Traffic()
        trained: dict[int, Message] = {}
        try:
            mean, included, dropped, bytes_per_param = self._protocol(nodes, global_state, server_round,
                                                                      traffic, trained)
        except (SecAggError, SecAggConfigError, RoundFailed) as err:
            reason = f"{type(err).__name__}: {err}"
            log.error("round %d: secure aggregation failed, the global adapter is unchanged for this round: %s",
                      server_round, reason)
            row = {"sites": 0, "rejected": len(nodes), "bytes_up": traffic.bytes_up,
                   "bytes_down": traffic.bytes_down, "secagg_failed": reason,
                   "secagg_dropped": [self._name(n) for n in nodes if n not in trained]}
            return global_state, row
        update = SiteUpdate(SECURE_SITE, mean.weight, mean.delta, {wire.NUM_EXAMPLES: mean.weight})
        new_state = self.coordinator.strategy.aggregate(global_state, [update])
        strategy_metrics = self.coordinator.strategy.round_metrics()
        # It compares the aggregate with each site's own update, which nobody sees here.
        strategy_metrics.pop("aggregation_error", None)
        row = {
            **({"train_loss": mean.loss} if mean.loss is not None else {}),
            "train_seconds": max(float(trained[n].content[wire.METRICS][wire.TRAIN_SECONDS]) for n in included),
            "sites": len(included),
            "rejected": len(dropped),
            "bytes_up": traffic.bytes_up,
            "bytes_down": traffic.bytes_down,
            "secagg_dropped": [self._name(n) for n in dropped],
            "secagg_max_error": mean.error_bound,
            "secagg_bytes_per_param": bytes_per_param,
            **self._dp_row(),
            **self.coordinator.privacy.row(),
            **strategy_metrics,
        }
        return new_state, row

    # -- the protocol ---------------------------------------------------------
    def _protocol(self, nodes, global_state, server_round, traffic, trained):
        strategy = self.coordinator.strategy
        layout = Layout.of(global_state, [k for k in sorted(global_state) if strategy.uploaded(k)])
        server = SecAggServer(nodes, session_config(self.config), vector_length=layout.size)
        s, fed = self.config.secagg, self.config.federation

        def stage(name: str, requests, timeout: float, records=None) -> dict[int, dict]:
            payloads, messages = self._stage(name, requests, server_round, timeout, traffic, records)
            if name == m.MASKED_INPUT:
                trained.update(messages)  # their clear metrics count once the round has succeeded
            return payloads

        replies = stage(m.SETUP, server.setup_requests(), s.stage_timeout)
        replies = stage(m.SHARE_KEYS, server.share_keys_requests(replies), s.stage_timeout)
        train_extra = {**strategy.client_config(server_round), LAYOUT: list(layout.names)}
        train_records = self.coordinator.round_records(global_state, server_round, train_extra)
        replies = stage(m.MASKED_INPUT, server.masked_input_requests(replies), fed.round_timeout, train_records)
        unmask = server.unmask_requests(replies)  # the masked inputs that arrived, summed
        result = server.aggregate(stage(m.UNMASK, unmask, s.stage_timeout))
        for node in result.included:
            self._observe(trained[node], server_round)
        try:  # under distributed DP every site weighs 1: the total weight is the number of sites
            mean = decode(result.sum, layout, s.clip_range, 1.0 if self.dp else s.max_weight, result.max_error)
        except ValueError as err:
            raise RoundFailed(str(err)) from err
        self.released += self.dp
        log.info("round %d: securely aggregated %d sites (dropped: %s), mean error <= %.3g per coordinate",
                 server_round, len(result.included), [self._name(n) for n in result.dropped] or "none",
                 mean.error_bound)
        return mean, result.included, result.dropped, server.quantizer.bytes_per_param

    def _stage(self, stage: str, requests: dict[int, dict], server_round: int, timeout: float,
               traffic: Traffic, records: dict | None) -> tuple[dict[int, dict], dict[int, Message]]:
        """One round trip: a message per request; the replies' payloads and messages by node
        (a missing or failed reply is a dropout)."""
        messages = []
        for node, request in requests.items():
            content = RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round}), **(records or {}),
                                  **payload_records(request)})
            messages.append(Message(content, dst_node_id=node, message_type=MESSAGE_TYPES[stage]))
        traffic.bytes_down += sum(payload_bytes(msg.content) for msg in messages)
        replies: dict[int, dict] = {}
        received: dict[int, Message] = {}
        for reply in self.coordinator.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                if is_budget_refusal(reply):
                    self.coordinator.privacy.refused(node, reply.error.reason)
                log.warning("round %d %s: %s dropped out: %s", server_round, stage, self._name(node),
                            reply.error.reason)
                continue
            traffic.bytes_up += payload_bytes(reply.content)
            try:
                payload = payload_of(reply.content)
            except ValueError as err:
                log.warning("round %d %s: malformed reply from %s dropped: %s", server_round, stage,
                            self._name(node), err)
                continue
            if wire.SITE in reply.content.config_records:
                self.names[node] = str(reply.content[wire.SITE][wire.SITE_NAME])
            replies[node], received[node] = payload, reply
        missing = sorted(set(requests) - set(replies))
        if missing:
            log.warning("round %d %s: no usable reply from %s", server_round, stage,
                        [self._name(n) for n in missing])
        return replies, received

    # -- bookkeeping ------------------------------------------------------------
    def _observe(self, reply: Message, server_round: int) -> None:
        site = str(reply.content[wire.SITE][wire.SITE_NAME])
        self.coordinator.privacy.observe(site, reply, server_round)  # DP-SGD epsilon reports
        self.coordinator.sites_seen.setdefault(site, {})["last_round"] = server_round

    def _name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def _dp_row(self) -> dict[str, Any]:
        if not self.dp:
            return {}
        s = self.config.secagg
        spent = distributed_dp.spent(s.dp_noise_multiplier, self.released, s.dp_delta)
        return {"secagg_dp_epsilon": spent["epsilon"], "secagg_dp_epsilon_rdp": spent["epsilon_rdp"],
                "secagg_dp_delta": spent["delta"]}
