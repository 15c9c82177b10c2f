"""The coordinator's round loop over Flower's Grid (Message API).

Each round: sample sites, send the global adapter, collect updates (rejecting
broken ones with a logged reason), let the strategy aggregate, evaluate at the
sites and centrally, append one metrics row, checkpoint. The strategy is the
only thing that knows the algorithm; this loop stays the same for all of them.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora import wire
from fedlora.arrays import State, from_record, payload_bytes, to_record
from fedlora.compression import decode
from fedlora.frozen_base import set_base_correction
from fedlora.privacy.server import ServerPrivacy, is_budget_refusal
from fedlora.server.central import CentralEvaluator
from fedlora.server.rundir import Checkpoint, RunDirectory
from fedlora.server.secure_round import SecureRounds
from fedlora.strategies.base import SiteUpdate, Strategy

log = logging.getLogger(__name__)


class TooFewSites(RuntimeError):
    pass


@dataclass
class PhaseResult:
    replies: list[Message]
    bytes_up: int = 0
    bytes_down: int = 0
    failures: list[str] = field(default_factory=list)


def _site_name(reply: Message) -> str:
    if wire.SITE in reply.content.config_records:
        return str(reply.content.config_records[wire.SITE][wire.SITE_NAME])
    return f"node-{reply.metadata.src_node_id}"


class Coordinator:
    def __init__(self, grid: Grid, config, strategy: Strategy, rundir: RunDirectory,
                 central: CentralEvaluator | None, fingerprint: str):
        self.grid = grid
        self.config = config
        self.strategy = strategy
        self.rundir = rundir
        self.central = central
        self.fingerprint = fingerprint
        self.sites_seen: dict[str, dict[str, Any]] = {}
        self.privacy = ServerPrivacy(config)  # site epsilon reports, budget refusals, client-level DP
        self.secure = SecureRounds(self) if config.secagg.enabled else None

    # -- messaging ------------------------------------------------------------
    def wait_for_sites(self) -> list[int]:
        fed = self.config.federation
        deadline = time.monotonic() + fed.wait_for_sites
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= fed.min_sites:
                return nodes
            if time.monotonic() > deadline:
                raise TooFewSites(f"only {len(nodes)} of federation.min-sites = {fed.min_sites} sites "
                                  f"connected within {fed.wait_for_sites:.0f}s")
            time.sleep(1.0)

    def sample(self, nodes: list[int], server_round: int) -> list[int]:
        k = max(1, math.ceil(self.config.federation.fraction_train * len(nodes)))
        return sorted(random.Random(f"{self.config.train.seed}:{server_round}").sample(nodes, k))

    def round_records(self, global_state: State, server_round: int,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The records of a train or evaluate message: the round's config and the adapter."""
        config = ConfigRecord({wire.SERVER_ROUND: server_round, wire.BASE_FINGERPRINT: self.fingerprint,
                               **(extra or {})})
        down = self.strategy.downlink(global_state)  # the adapter (and any base correction) sites get
        return {**{name: to_record(arrays) for name, arrays in down.items()}, wire.CONFIG: config}

    def exchange(self, nodes: list[int], message_type: str, global_state: State, server_round: int,
                 extra: dict[str, Any] | None = None) -> PhaseResult:
        messages = [Message(RecordDict(self.round_records(global_state, server_round, extra)),
                            dst_node_id=node, message_type=message_type) for node in nodes]
        result = PhaseResult([], bytes_down=sum(payload_bytes(m.content) for m in messages))
        for reply in self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout):
            if reply.has_error():
                if is_budget_refusal(reply):
                    self.privacy.refused(reply.metadata.src_node_id, reply.error.reason)
                result.failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            result.bytes_up += payload_bytes(reply.content)
            result.replies.append(reply)
        missing = len(nodes) - len(result.replies) - len(result.failures)
        if missing > 0:
            result.failures.append(f"{missing} site(s) did not reply within {self.config.federation.round_timeout:.0f}s")
        for failure in result.failures:
            log.warning("round %d %s: %s", server_round, message_type, failure)
        return result

    def upload(self, reply: Message, global_state: State) -> tuple[State, str | None]:
        """A train reply's update as dense float32 tensors (decoded under [compression]), or why not."""
        method = self.config.compression.method
        if method == "none":
            return from_record(reply.content[wire.ARRAYS]), None
        try:  # bounded by the global adapter's size, so a forged encoding cannot exhaust memory
            return decode(from_record(reply.content[wire.ARRAYS]), method,
                          max_elements=sum(v.size for v in global_state.values())), None
        except ValueError as err:
            return {}, f"malformed {method} upload: {err}"

    # -- phases ---------------------------------------------------------------
    def train_round(self, nodes: list[int], global_state: State, server_round: int) -> tuple[State, dict]:
        if self.secure is not None:  # secure aggregation: only the sum is revealed (server/secure_round.py)
            return self.secure.train_round(nodes, global_state, server_round)
        phase = self.exchange(nodes, MessageType.TRAIN, global_state, server_round,
                              self.strategy.client_config(server_round))
        updates: list[SiteUpdate] = []
        for reply in phase.replies:
            site = _site_name(reply)
            metrics = dict(reply.content[wire.METRICS])
            weight = float(metrics.get(wire.NUM_EXAMPLES, 0))
            delta, problem = self.upload(reply, global_state)
            update = SiteUpdate(site, weight, delta, metrics)
            problem = problem or self.strategy.check_upload(update, global_state)  # tensors, shapes, rank
            if problem is None and weight <= 0:
                problem = f"non-positive weight {weight}"
            if problem:
                log.warning("round %d: rejected the update of %s: %s", server_round, site, problem)
                phase.failures.append(f"{site}: {problem}")
                continue
            updates.append(update)
            self.privacy.observe(site, reply, server_round)
            self.sites_seen.setdefault(site, {})["last_round"] = server_round
        if len(updates) < self.config.federation.min_sites:
            raise TooFewSites(f"round {server_round}: {len(updates)} usable updates, fewer than "
                              f"federation.min-sites = {self.config.federation.min_sites}")
        new_state = self.strategy.aggregate(global_state,
                                            self.privacy.before_aggregate(updates, len(nodes), server_round))
        # Under DP-SGD sites keep their training loss (it is not noised): no train_loss then.
        losses = [(u.weight, u.metrics[wire.TRAIN_LOSS]) for u in updates if wire.TRAIN_LOSS in u.metrics]
        row = {
            **({"train_loss": sum(w * x for w, x in losses) / sum(w for w, _ in losses)} if losses else {}),
            "train_seconds": max(u.metrics[wire.TRAIN_SECONDS] for u in updates),
            "sites": len(updates),
            "rejected": len(phase.failures),
            "bytes_up": phase.bytes_up,
            "bytes_down": phase.bytes_down,
            **self.privacy.row(),
            **self.strategy.round_metrics(),  # aggregation_error and the strategy's own figures
        }
        return new_state, row

    def evaluate_round(self, nodes: list[int], global_state: State, server_round: int) -> dict[str, Any]:
        phase = self.exchange(nodes, MessageType.EVALUATE, global_state, server_round,
                              self.strategy.client_config(server_round))
        counts: dict[str, Any] = {}
        for reply in phase.replies:
            m = reply.content[wire.METRICS]
            if int(m[wire.EVAL_COUNT]) == 0:
                continue
            part = {"count": int(m[wire.EVAL_COUNT]), "loss_sum": float(m[wire.EVAL_LOSS_SUM]),
                    "tokens": int(m[wire.EVAL_TOKENS]), "correct": int(m[wire.EVAL_CORRECT])}
            for key, name in ((wire.EVAL_TP, "tp"), (wire.EVAL_FP, "fp"), (wire.EVAL_FN, "fn")):
                if len(m[key]):
                    part[name] = [int(v) for v in m[key]]
            self.central_task.add_counts(counts, part)
        row = self.central_task.metrics(counts) if counts else {}
        row.update(bytes_up=phase.bytes_up, bytes_down=phase.bytes_down)
        return row

    @property
    def central_task(self):
        return self.central.task

    # -- the run --------------------------------------------------------------
    def run(self, global_state: State, start_round: int = 1) -> State:
        fed = self.config.federation
        nodes = self.wait_for_sites()
        log.info("%d sites connected; rounds %d..%d with strategy %s", len(nodes), start_round, fed.rounds,
                 self.strategy.name)
        for server_round in range(start_round, fed.rounds + 1):
            started = time.perf_counter()
            nodes = sorted(self.grid.get_node_ids())
            can_train = self.privacy.eligible(nodes)  # less the sites out of privacy budget
            if len(can_train) < fed.min_sites:
                why = (f"round {server_round}: {len(can_train)} sites can train, fewer than "
                       f"federation.min-sites = {fed.min_sites}")
                if self.privacy.stop(why):
                    break
                raise TooFewSites(why)
            try:
                global_state, row = self.train_round(self.sample(can_train, server_round), global_state,
                                                     server_round)
            except TooFewSites as err:
                if self.privacy.stop(str(err)):  # sites refused for lack of budget: end cleanly
                    break
                raise
            evaluation = self.evaluate_round(nodes, global_state, server_round)
            row["bytes_up"] += evaluation.pop("bytes_up")
            row["bytes_down"] += evaluation.pop("bytes_down")
            row.update(evaluation)
            if self.central.has_test_set:
                set_base_correction(self.central.loaded.model, self.strategy.base_correction())
                row.update(self.central.evaluate(global_state))
            row = {"round": server_round, **row, "round_seconds": time.perf_counter() - started}
            self.rundir.append_metrics(row)
            self.rundir.save_checkpoint(Checkpoint(server_round, global_state, self.strategy.state_dict(),
                                                   {"sites": self.sites_seen,
                                                    "privacy": self.privacy.state_dict()}))
            log.info("round %d/%d done in %.1fs: %s", server_round, fed.rounds, row["round_seconds"],
                     ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                               if k.startswith(("train_loss", "eval_", "test_")) and isinstance(v, float)))
        return global_state
