"""Collecting a training round under secure aggregation: the coordinator learns only the sum.

The four protocol stages (fedlora/privacy/secagg) run as four Message-API round
trips through the Grid, one `send_and_receive` each. Every message is of type
`train` and carries the stage in its `secagg` record; at the site a ClientApp
mod answers it (fedlora.client.secure). The masked-input stage also carries the
global adapter: the sites train, then upload only their masked vector. The
revealed sum becomes one pseudo-update, the weighted mean of the sites'
updates, which the (linear) strategy aggregates as it would the individual
updates.

A site that fails or vanishes after key agreement is recovered from its
neighbours' shares while at least the threshold survive. Below that the round
fails: the failure is logged and recorded (`secagg_failed`), the global
adapter stays as it was, and the run continues with the next round.

Under distributed DP (secagg.dp-noise-multiplier) every released sum is one
Gaussian release at the site level; the count of releases is this collector's
state, kept in the coordinator's checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedlora import wire
from fedlora.arrays import State
from fedlora.privacy.secagg import SecAggConfigError, SecAggError, SecAggServer, distributed_dp
from fedlora.privacy.secagg import messages as m
from fedlora.privacy.secagg.records import payload_of, payload_records
from fedlora.privacy.secagg.session import session_config
from fedlora.privacy.secagg.updates import LAYOUT, Layout, decode
from fedlora.server.collect import Accept, Collected, Messenger, Traffic, site_name
from fedlora.strategies.base import SiteUpdate

log = logging.getLogger(__name__)

SECURE_SITE = "secure-aggregate"  # the name of the one pseudo-update the strategy sees


class RoundFailed(RuntimeError):
    """The round cannot finish securely; the global adapter stays unchanged."""


class SecureCollector:
    """Only the weighted sum of the sampled sites' updates."""

    def __init__(self, messenger: Messenger, config, uploaded):
        self.messenger = messenger
        self.config = config
        self.uploaded = uploaded  # which adapter tensors sites send (the strategy's `uploaded`)
        self.dp = config.secagg.dp_noise_multiplier > 0
        self.released = 0  # noised sums revealed so far (distributed DP accounting)

    def collect(self, nodes: list[int], records: dict[str, Any], global_state: State, server_round: int,
                accept: Accept) -> Collected:
        traffic = Traffic()
        trained: dict[int, Message] = {}
        try:
            mean, included, dropped, bytes_per_param = self._protocol(nodes, records, global_state, server_round,
                                                                      traffic, trained)
        except (SecAggError, SecAggConfigError, RoundFailed) as err:
            reason = f"{type(err).__name__}: {err}"
            log.error("round %d: secure aggregation failed, the global adapter is unchanged for this round: %s",
                      server_round, reason)
            row = {"sites": 0, "rejected": len(nodes), "secagg_failed": reason,
                   "secagg_dropped": [self.messenger.name(n) for n in nodes if n not in trained]}
            return Collected([], [], list(trained.values()), traffic, [reason], row, failed=reason)
        update, problem = accept(SiteUpdate(SECURE_SITE, mean.weight, mean.delta, {wire.NUM_EXAMPLES: mean.weight}),
                                 global_state)
        if problem:
            reason = f"the revealed sum cannot be aggregated: {problem}"
            log.error("round %d: %s", server_round, reason)
            return Collected([], [], list(trained.values()), traffic, [reason],
                             {"sites": 0, "rejected": len(nodes), "secagg_failed": reason}, failed=reason)
        self.released += self.dp
        row = {
            **({"train_loss": mean.loss} if mean.loss is not None else {}),
            "train_seconds": max(float(trained[n].content[wire.METRICS][wire.TRAIN_SECONDS]) for n in included),
            "sites": len(included),
            "rejected": len(dropped),
            "secagg_dropped": [self.messenger.name(n) for n in dropped],
            "secagg_max_error": mean.error_bound,
            "secagg_bytes_per_param": bytes_per_param,
            **({"secagg_weak_threshold": True} if self.config.secagg.allow_weak_threshold else {}),
            **self._dp_row(),
        }
        return Collected([update], [site_name(trained[n]) for n in included], list(trained.values()), traffic, [],
                         row, individual=False)

    # -- the protocol ---------------------------------------------------------
    def _protocol(self, nodes, records, global_state, server_round, traffic, trained):
        layout = Layout.of(global_state, [k for k in sorted(global_state) if self.uploaded(k)])
        server = SecAggServer(nodes, session_config(self.config), vector_length=layout.size)
        s, fed = self.config.secagg, self.config.federation

        def stage(name: str, requests, timeout: float, extra=None) -> dict[int, dict]:
            payloads, messages = self._stage(name, requests, server_round, timeout, traffic, extra)
            if name == m.MASKED_INPUT:
                trained.update(messages)  # their clear metrics count once the round has succeeded
            return payloads

        replies = stage(m.SETUP, server.setup_requests(), s.stage_timeout)
        replies = stage(m.SHARE_KEYS, server.share_keys_requests(replies), s.stage_timeout)
        config = records[wire.CONFIG]
        train_records = {**records, wire.CONFIG: ConfigRecord({**config, LAYOUT: list(layout.names)})}
        replies = stage(m.MASKED_INPUT, server.masked_input_requests(replies), fed.round_timeout, train_records)
        unmask = server.unmask_requests(replies)  # the masked inputs that arrived, summed
        result = server.aggregate(stage(m.UNMASK, unmask, s.stage_timeout))
        try:  # under distributed DP every site weighs 1: the total weight is the number of sites
            mean = decode(result.sum, layout, s.clip_range, 1.0 if self.dp else s.max_weight, result.max_error)
        except ValueError as err:
            raise RoundFailed(str(err)) from err
        log.info("round %d: securely aggregated %d sites (dropped: %s), mean error <= %.3g per coordinate",
                 server_round, len(result.included), [self.messenger.name(n) for n in result.dropped] or "none",
                 mean.error_bound)
        return mean, result.included, result.dropped, server.quantizer.bytes_per_param

    def _stage(self, stage: str, requests: dict[int, dict], server_round: int, timeout: float,
               traffic: Traffic, records: dict | None) -> tuple[dict[int, dict], dict[int, Message]]:
        """One round trip: a message per request; the replies' payloads and messages by node
        (a missing or failed reply is a dropout)."""
        base = records or {wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round})}
        messages = [Message(RecordDict({**base, **payload_records(request)}), dst_node_id=node,
                            message_type=MessageType.TRAIN) for node, request in requests.items()]
        ok, _ = self.messenger.send(messages, timeout, traffic, f"secagg {stage}", server_round)
        replies: dict[int, dict] = {}
        received: dict[int, Message] = {}
        for reply in ok:
            node = reply.metadata.src_node_id
            try:
                payload = payload_of(reply.content)
            except ValueError as err:
                log.warning("round %d secagg %s: malformed reply from %s dropped: %s", server_round, stage,
                            self.messenger.name(node), err)
                continue
            replies[node], received[node] = payload, reply
        return replies, received

    # -- bookkeeping ------------------------------------------------------------
    def _dp_row(self) -> dict[str, Any]:
        if not self.dp:
            return {}
        s = self.config.secagg
        spent = distributed_dp.spent(s.dp_noise_multiplier, self.released, s.dp_delta)
        return {"secagg_dp_epsilon": spent["epsilon"], "secagg_dp_epsilon_rdp": spent["epsilon_rdp"],
                "secagg_dp_delta": spent["delta"]}

    def state_dict(self) -> dict[str, Any]:
        return {"released": self.released}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.released = int(state.get("released", 0))
