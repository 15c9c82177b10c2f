"""The coordinator's one round pipeline over Flower's Grid (Message API).

    (forecast, once) → sample → configure → collect → aggregate → evaluate → record → checkpoint

The same code runs every feature combination. What varies is composed before
the run starts, in two places: the collector (plain: each site's update;
secure: only their sum, collect.py and secure_collect.py) and the strategy
with its server-side wrappers (norm bound, client-level DP, decoding
compressed uploads: fedlora.strategies.compose). `state_dict()` composes
everything a resumed run needs (strategy and wrappers, the sites' privacy
reports and refusals, the collector's counters, the sites seen), so a run
killed after round k and resumed ends where an uninterrupted run ends.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora import wire
from fedlora.arrays import State, to_record
from fedlora.frozen_base import set_base_correction
from fedlora.privacy import forecast
from fedlora.server import drift_check
from fedlora.server.central import CentralEvaluator
from fedlora.server.collect import Collected, Messenger, Traffic
from fedlora.server.rundir import Checkpoint, RunDirectory
from fedlora.strategies.base import RoundInfo, StopRun, Strategy

log = logging.getLogger(__name__)


class TooFewSites(RuntimeError):
    pass


class Coordinator:
    def __init__(self, grid: Grid, config, strategy: Strategy, collector, messenger: Messenger,
                 rundir: RunDirectory, central: CentralEvaluator | None, fingerprint: str):
        self.grid = grid
        self.config = config
        self.strategy = strategy
        self.collector = collector       # PlainCollector or SecureCollector
        self.messenger = messenger
        self.privacy = messenger.privacy  # the sites' epsilon reports and budget refusals
        self.rundir = rundir
        self.central = central
        self.fingerprint = fingerprint
        self.sites_seen: dict[str, dict[str, Any]] = {}

    # -- sample ---------------------------------------------------------------
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
        """The sites asked to train: a fixed share drawn reproducibly from the run's seed, or, when the
        strategy's guarantee is amplified by sampling (client-level DP), each site with probability
        fraction-train from the operating system's secret random source (Poisson sampling)."""
        q = self.config.federation.fraction_train
        if self.strategy.needs_secret_sampling:
            draw = secrets.SystemRandom()
            return sorted(n for n in nodes if draw.random() < q)
        k = max(1, math.ceil(q * len(nodes)))
        return sorted(random.Random(f"{self.config.train.seed}:{server_round}").sample(nodes, k))

    # -- configure --------------------------------------------------------------
    def round_records(self, global_state: State, server_round: int, extra: dict | None = None) -> dict[str, Any]:
        """The records of a round's train and evaluate messages: the adapter (and any base
        correction) the strategy sends down, and the round's instructions (plus `extra` ones)."""
        config = ConfigRecord({wire.SERVER_ROUND: server_round, wire.BASE_FINGERPRINT: self.fingerprint,
                               **self.strategy.client_config(server_round), **(extra or {})})
        down = self.strategy.downlink(global_state)
        return {**{name: to_record(arrays) for name, arrays in down.items()}, wire.CONFIG: config}

    # -- collect and aggregate ---------------------------------------------------
    def train_round(self, nodes: list[int], global_state: State, server_round: int,
                    available: int | None = None) -> tuple[State, dict[str, Any]]:
        """One training round with the sampled `nodes`: the next global adapter and the round's columns."""
        self.strategy.begin_round(RoundInfo(server_round, len(nodes), available or len(nodes),
                                            self.config.federation.fraction_train))
        collected = self.collector.collect(nodes, self.round_records(global_state, server_round), global_state,
                                           server_round, self.strategy.accept)
        snapshots = {}
        for reply in collected.reports:  # the clear part of every train reply: epsilon reports, data digest
            site = self.messenger.name(reply.metadata.src_node_id)
            self.privacy.observe(site, reply, server_round)
            if wire.DATA_SNAPSHOT in reply.content.config_records.get(wire.SITE, {}):
                snapshots[site] = str(reply.content[wire.SITE][wire.DATA_SNAPSHOT])
        row = {**collected.row, "bytes_up": collected.traffic.bytes_up, "bytes_down": collected.traffic.bytes_down}
        if collected.failed:  # e.g. secure aggregation below its threshold: the adapter stays
            return global_state, {**row, **self.privacy.row()}
        self._too_few(collected, server_round)
        new_state = self.strategy.aggregate(global_state, collected.updates)
        for site in collected.contributors:
            self.sites_seen.setdefault(site, {})["last_round"] = server_round
            if site in snapshots:  # which data it last trained on, as a digest only it can check
                self.sites_seen[site]["data_digest"] = snapshots[site]
        metrics = self.strategy.round_metrics()  # aggregation_error and the strategy's own figures
        if not collected.individual:
            metrics["aggregation_error"] = None  # it compares with each site's own update: nobody saw one
        return new_state, {**row, **self.privacy.row(), **metrics}

    def _too_few(self, collected: Collected, server_round: int) -> None:
        min_sites = self.config.federation.min_sites
        if len(collected.contributors) < min_sites:
            raise TooFewSites(f"round {server_round}: {len(collected.contributors)} usable updates, fewer than "
                              f"federation.min-sites = {min_sites}")

    # -- evaluate -----------------------------------------------------------------
    @property
    def keeps_site_figures(self) -> bool:
        """Each site's own evaluation figures are recorded unless they would give away what the run hides:
        a site's size under secure aggregation (its held-out count), or under client-level DP which sites
        were sampled (a sampled site that missed the deadline is not asked to evaluate)."""
        return not (self.config.secagg.enabled or self.strategy.needs_secret_sampling)

    def evaluation_sample(self, nodes: list[int], server_round: int) -> list[int]:
        """The sites asked to evaluate this round: every federation.evaluate-every rounds a share
        (federation.fraction-evaluate) drawn reproducibly from the run's seed, and in the last round every
        site, so the run ends with each site's own figures. A round's cost then grows with the sites
        sampled, not with the sites connected."""
        fed = self.config.federation
        if server_round >= fed.rounds:
            return nodes
        if server_round % fed.evaluate_every:
            return []
        if fed.fraction_evaluate >= 1:
            return nodes
        k = max(1, math.ceil(fed.fraction_evaluate * len(nodes)))
        return sorted(random.Random(f"{self.config.train.seed}:evaluate:{server_round}").sample(nodes, min(k, len(nodes))))

    def evaluate_round(self, nodes: list[int], global_state: State, server_round: int,
                       extra: dict | None = None) -> dict[str, Any]:
        """Every connected site scores the global adapter on its held-out rows; the sums pool exactly."""
        traffic = Traffic()
        records = self.round_records(global_state, server_round, extra)
        messages = [Message(RecordDict(dict(records)), dst_node_id=node, message_type=MessageType.EVALUATE)
                    for node in nodes]
        replies, _ = self.messenger.send(messages, self.config.federation.round_timeout, traffic,
                                         MessageType.EVALUATE, server_round)
        task = self.central.task

        def figures(part: dict[str, Any]) -> dict[str, Any]:
            return {**task.metrics(part), **{f"eval_{k}": v for k, v in task.details(part).items()}}

        counts: dict[str, Any] = {}
        per_site: dict[str, dict[str, Any]] = {}
        for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):  # the same order every time
            m = reply.content[wire.METRICS]
            if int(m[wire.EVAL_COUNT]) == 0:
                continue
            part = {}
            for key, (name, kind) in wire.EVAL_COUNTS.items():
                value = m.get(key)
                if isinstance(value, list):
                    if value:  # a task without this count sends an empty list
                        part[name] = [kind(v) for v in value]
                elif value is not None:
                    part[name] = kind(value)
            task.add_counts(counts, part)
            if self.keeps_site_figures:
                # each site's own figures: the coordinator holds these counts anyway, and a hospital where
                # the model is weaker must show, not only the mean
                node = reply.metadata.src_node_id
                site = self.messenger.name(node)
                site = f"{site} (node {node})" if site in per_site else site  # two sites may share a name
                per_site[site] = {**figures(part), "eval_count": part["count"]}
        row = figures(counts) if counts else {}
        if self.keeps_site_figures:  # how many sites the pooled figures cover (hidden as eval_sites is)
            row["evaluated"] = len(per_site)
        if per_site:
            row["eval_sites"] = dict(sorted(per_site.items()))
        return {**row, "bytes_up": traffic.bytes_up, "bytes_down": traffic.bytes_down}

    # -- forecast ---------------------------------------------------------------
    def forecast(self, nodes: list[int], first_round: int) -> None:
        """Before the first round, every site's own account of what the run would cost it
        (privacy/forecast.py): logged, and kept for summary.json."""
        config = ConfigRecord({wire.SERVER_ROUND: first_round})
        messages = [Message(RecordDict({wire.CONFIG: config}), dst_node_id=node, message_type=MessageType.QUERY)
                    for node in nodes]
        replies, _ = self.messenger.send(messages, self.config.federation.round_timeout, Traffic(),
                                         MessageType.QUERY, first_round)
        answers = {self.messenger.name(reply.metadata.src_node_id): dict(reply.content[forecast.RECORD])
                   for reply in replies if forecast.RECORD in reply.content.metric_records}
        self.privacy.forecast = forecast.report(answers)

    # -- the run --------------------------------------------------------------
    def run(self, global_state: State, start_round: int = 1) -> State:
        fed = self.config.federation
        nodes = self.wait_for_sites()
        log.info("%d sites connected; rounds %d..%d with strategy %s", len(nodes), start_round, fed.rounds,
                 self.strategy.name)
        if start_round <= fed.rounds:
            self.forecast(nodes, start_round)
        sampled_evaluation = None  # the last round's row, while its sites' evaluation was a sample
        for server_round in range(start_round, fed.rounds + 1):
            started = time.perf_counter()
            nodes = sorted(self.grid.get_node_ids())
            self.messenger.silent.clear()
            can_train = self.privacy.eligible(nodes)  # less the sites out of privacy budget
            try:
                if len(can_train) < fed.min_sites:
                    raise TooFewSites(f"round {server_round}: {len(can_train)} sites can train, fewer than "
                                      f"federation.min-sites = {fed.min_sites}")
                sampled = self.sample(can_train, server_round)
                if len(sampled) < fed.min_sites and self.strategy.needs_secret_sampling:
                    # Poisson sampling drew too few this time: nothing is trained or released (no privacy cost)
                    row = {"sites": 0, "rejected": 0, "bytes_up": 0, "bytes_down": 0,
                           "skipped": f"{len(sampled)} sites sampled, fewer than federation.min-sites"}
                    log.warning("round %d: %s; the adapter is unchanged", server_round, row["skipped"])
                else:
                    global_state, row = self.train_round(sampled, global_state, server_round, len(can_train))
            except StopRun as err:  # a server-side feature's budget is spent: end cleanly
                self.privacy.stopped = str(err)
                log.warning("ending the run: %s", err)
                break
            except TooFewSites as err:
                if self.privacy.stop(str(err)):  # sites refused for lack of budget: end cleanly
                    break
                raise
            # A site that let this round's deadline pass (crashed, cut off) is not waited for twice.
            answering = [n for n in nodes if n not in self.messenger.silent]
            evaluating = self.evaluation_sample(answering, server_round)
            if evaluating:
                evaluation = self.evaluate_round(evaluating, global_state, server_round)
                row["bytes_up"] += evaluation.pop("bytes_up")
                row["bytes_down"] += evaluation.pop("bytes_down")
                row.update(evaluation)
            if self.central.has_test_set:
                set_base_correction(self.central.loaded.model, self.strategy.base_correction())
                row.update(self.central.evaluate(global_state))
            row = {"round": server_round, **row, "round_seconds": time.perf_counter() - started}
            self.rundir.append_metrics(row)
            self.rundir.save_checkpoint(Checkpoint(server_round, global_state, self.state_dict()))
            sampled_evaluation = row if len(evaluating) < len(answering) else None
            log.info("round %d/%d done in %.1fs: %s", server_round, fed.rounds, row["round_seconds"],
                     ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                               if k.startswith(("train_loss", "eval_", "test_")) and isinstance(v, float)))
        if sampled_evaluation is not None:  # the run stopped early: its last figures still cover every site
            self.evaluate_everywhere(sampled_evaluation, global_state)
        return global_state

    def evaluate_everywhere(self, row: dict[str, Any], global_state: State) -> None:
        """Replace the last row's sampled site evaluation with one at every answering site."""
        nodes = [n for n in sorted(self.grid.get_node_ids()) if n not in self.messenger.silent]
        evaluation = self.evaluate_round(nodes, global_state, row["round"])
        kept = {k: v for k, v in row.items() if not k.startswith("eval_") and k != "evaluated"}
        kept["bytes_up"] += evaluation.pop("bytes_up")
        kept["bytes_down"] += evaluation.pop("bytes_down")
        self.rundir.truncate_metrics(row["round"] - 1)
        self.rundir.append_metrics({**kept, **evaluation})
        log.info("round %d: evaluated at all %d answering sites, as the run's last round", row["round"], len(nodes))

    def compare(self, states: dict[str, State], review: str, review_rows: int) -> dict[str, dict[str, Any]]:
        """An evaluation-only round: every connected site scores each of `states` on its held-out rows,
        one after the other in the same round (the promotion gate's evidence); no site trains. Each site
        also keeps both models' outputs on `review_rows` of its rows for its expert's blind review, and
        first answers with the counts of any review of the same two models (`review`) it already holds."""
        self.wait_for_sites()
        nodes = sorted(self.grid.get_node_ids())  # every site connected now, not only the first min-sites
        log.info("%d sites connected; evaluating %s, no training", len(nodes), " and ".join(states))
        scores: dict[str, dict[str, Any]] = {"review": self.review_counts(nodes, review)}
        for name, state in states.items():
            row = self.evaluate_round(nodes, state, 0, {wire.REVIEW_PAIR: review, wire.REVIEW_ROLE: name,
                                                        wire.REVIEW_ROWS: review_rows})
            scores[name] = {"sites": row.pop("eval_sites", {}),
                            "pooled": {k: v for k, v in row.items() if not k.startswith("bytes_")}}
            if self.central.has_test_set:
                scores[name]["central"] = self.central.evaluate(state)
        scores["asked"] = sorted(self.messenger.name(node) for node in nodes)  # each must score both
        return scores

    def drift(self, nodes: list[int]) -> dict[str, dict[str, Any]]:
        """Each site's drift figures against what it last trained on (fedlora.server.drift_check); a site
        that does not share them (node config share-drift) or does not answer is listed as not sharing."""
        messages = [Message(RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 0})}), dst_node_id=node,
                            message_type=f"{MessageType.QUERY}.{wire.DRIFT_QUERY}") for node in nodes]
        errors: dict[int, int] = {}
        replies, _ = self.messenger.send(messages, self.config.federation.round_timeout, Traffic(),
                                         MessageType.QUERY, 0, errors)
        # no reply, or an error other than "not shared": the site could not be checked, which is not a "no"
        answers = {node: drift_check.site_answer(None, None) if errors.get(node) == wire.DRIFT_NOT_SHARED
                   else drift_check.FAILED for node in nodes}
        for reply in replies:
            if wire.DRIFT in reply.content.metric_records:
                snapshot = reply.content.config_records.get(wire.DRIFT_SNAPSHOT)
                answers[reply.metadata.src_node_id] = drift_check.site_answer(
                    dict(reply.content[wire.DRIFT]), str(snapshot[wire.DRIFT_DIGEST]) if snapshot else None)
        return {self.messenger.name(node): answer for node, answer in answers.items()}

    def review_counts(self, nodes: list[int], review: str) -> dict[str, dict[str, int]]:
        """Each site's counts of its expert's verdicts on the two models (fedlora.client.review), if any."""
        config = ConfigRecord({wire.REVIEW_PAIR: review})
        messages = [Message(RecordDict({wire.CONFIG: config}), dst_node_id=node,
                            message_type=f"{MessageType.QUERY}.{wire.REVIEW_QUERY}") for node in nodes]
        replies, _ = self.messenger.send(messages, self.config.federation.round_timeout, Traffic(),
                                         MessageType.QUERY, 0)
        return {self.messenger.name(reply.metadata.src_node_id): {k: int(v) for k, v in reply.content[wire.REVIEW].items()}
                for reply in replies if wire.REVIEW in reply.content.metric_records}

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a restarted coordinator needs to continue exactly."""
        return {"strategy": self.strategy.state_dict(), "privacy": self.privacy.state_dict(),
                "collector": self.collector.state_dict(), "sites": self.sites_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self.privacy.load_state_dict(state["privacy"])
        self.collector.load_state_dict(state["collector"])
        self.sites_seen = {site: dict(seen) for site, seen in state["sites"].items()}
