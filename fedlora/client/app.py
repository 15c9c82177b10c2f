"""The ClientApp: what each site runs for every message from the coordinator.

Train: set the global adapter, train locally (DP-SGD wraps the same loop when
the run or the site asks for it), reply with the update (local − global) and
the site's weight. Evaluate: score the global adapter on the site's held-out
rows and reply with sums the server pools exactly. Query (once, before round
one): the site's own forecast of what the run will cost its privacy budget
(privacy/forecast.py). Only trainable adapter tensors (and a task head) ever
leave the site.

What a site does to every message on top of that is a Flower ClientApp mod,
in `SITE_MODS`: errors are logged at the site and reported upstream as a
category and a count only (client/mods.py), secure aggregation
(client/secure.py) masks the upload, and upload compression (client/mods.py)
encodes it. Simulations that need
misbehaving sites build their own ClientApp with `build_client_app` and more
mods (fedlora.simulations.misbehaving); this module never imports them.
"""

from __future__ import annotations

import logging
from typing import Callable

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import wire
from fedlora.arrays import to_record
from fedlora.client.mods import compression_mod, site_errors_mod
from fedlora.client.runtime import BaseModelMismatch, SiteRuntime, site_config, site_runtime
from fedlora.client.secure import durable_folder, secure_aggregation_mod
from fedlora.client.site_strategy import SitePlan
from fedlora.privacy import forecast
from fedlora.privacy.distributed_site import forecast_releases, site_accounts
from fedlora.privacy.site_train import BudgetExhausted, dp_enabled, forecast_privately, train_privately
from fedlora.training import evaluate_counts, plain_train, site_seed

log = logging.getLogger(__name__)

Runtime = Callable[[Context], SiteRuntime]
SITE_MODS = [site_errors_mod, secure_aggregation_mod, compression_mod]  # outermost first


def _set_global(rt: SiteRuntime, msg: Message, plan: SitePlan) -> dict:
    expected = msg.content[wire.CONFIG].get(wire.BASE_FINGERPRINT, "")
    if expected and expected != rt.loaded.fingerprint:
        raise BaseModelMismatch(
            f"site {rt.data.name}: base model weights differ from the coordinator's "
            f"(fingerprint {rt.loaded.fingerprint} != {expected}); check model.name and its files")
    return plan.start(msg)  # base correction, site rank, the site's own B (see site_strategy)


def _site_record(rt: SiteRuntime) -> ConfigRecord:
    return ConfigRecord({wire.SITE_NAME: rt.data.name, wire.SKIPPED_ROWS: len(rt.data.skipped)})


def train(rt: SiteRuntime, msg: Message, context: Context) -> Message:
    plan = SitePlan.for_message(rt, msg, context)
    global_state = _set_global(rt, msg, plan)
    server_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
    seed = site_seed(rt.config.train.seed, rt.site_index, server_round)
    private = None
    with plan.training(global_state) as extra_loss:  # FFA freezes A; FedProx adds its term
        if dp_enabled(rt.config, context.node_config):
            try:  # DP-SGD; the spend is on the site's disk before this reply is built
                private = train_privately(rt, context.node_config, server_round, seed, str(context.run_id),
                                          extra_loss=extra_loss,
                                          anchor=str(msg.content[wire.CONFIG].get(wire.LEDGER_ANCHOR, "")))
            except BudgetExhausted as err:
                log.warning("%s", err)
                reason = err.brief if rt.config.secagg.enabled else str(err)  # figures would give its size away
                return Message(Error(code=wire.BUDGET_EXHAUSTED, reason=reason), reply_to=msg)
            result = private.result
        else:
            result = plain_train(rt.loaded.model, rt.task, rt.train_examples, rt.config.train, rt.pad_id, seed,
                                 extra_loss=extra_loss)
    delta = plan.update(global_state)
    log.info("site %s round %d: %d steps, loss %.4f, %.1fs", rt.data.name, server_round,
             result.steps, result.mean_loss, result.seconds)
    metrics = MetricRecord({
        wire.NUM_EXAMPLES: len(rt.train_examples),
        wire.TRAIN_LOSS: result.mean_loss,
        wire.TRAIN_SECONDS: result.seconds,
        wire.LOCAL_STEPS: result.steps,
        wire.LORA_RANK: rt.rank,
    })
    content = RecordDict({wire.ARRAYS: to_record(delta), wire.METRICS: metrics, wire.SITE: _site_record(rt)})
    if private is not None or rt.config.privacy.client_dp:  # data-dependent, not noised: it stays here
        del metrics[wire.TRAIN_LOSS]
    if private is not None:
        metrics.update(private.metrics)
        content[wire.PRIVACY] = ConfigRecord(private.record)
    return Message(content, reply_to=msg)


def evaluate(rt: SiteRuntime, msg: Message, context: Context) -> Message:
    _set_global(rt, msg, SitePlan.for_message(rt, msg, context))
    counts = evaluate_counts(rt.loaded.model, rt.task, rt.eval_examples, rt.pad_id) if rt.eval_examples else {}
    metrics = MetricRecord({key: _eval_value(counts.get(name), kind) for key, (name, kind) in wire.EVAL_COUNTS.items()})
    return Message(RecordDict({wire.METRICS: metrics, wire.SITE: _site_record(rt)}), reply_to=msg)


def _eval_value(value, kind: type):
    """A count as a MetricRecord holds it: a number (0 when the task has no such count) or a list."""
    if isinstance(value, list):
        return [kind(v) for v in value]
    return kind(value or 0)


def query(rt_of: Runtime, msg: Message, context: Context) -> Message:
    """The pre-run privacy forecast (privacy/forecast.py): what this run would cost this site, from its
    own ledger and budget; nothing is written or spent. A site that spends no budget answers without
    loading its model."""
    config, node = site_config(context), context.node_config
    first_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
    records: dict = {}
    dp_sgd = distributed = None
    if dp_enabled(config, node):
        rt = rt_of(context)
        dp_sgd = forecast_privately(rt, node, first_round, str(context.run_id),
                                    str(msg.content[wire.CONFIG].get(wire.LEDGER_ANCHOR, "")))
        records[wire.SITE] = _site_record(rt)
    s = config.secagg
    if s.enabled and site_accounts(s, node):
        distributed = forecast_releases(durable_folder(context), node, config.privacy.epsilon, s.dp_noise_multiplier,
                                        max(0, config.federation.rounds - first_round + 1))
    records[forecast.RECORD] = MetricRecord(forecast.pack(dp_sgd, distributed, secure=s.enabled))
    return Message(RecordDict(records), reply_to=msg)


def build_client_app(runtime: Runtime = site_runtime, mods: list | None = None) -> ClientApp:
    """A ClientApp answering train and evaluate messages with the site that `runtime` builds
    from a message's Context (its model, data and configuration), through `mods`."""
    client = ClientApp(mods=list(SITE_MODS if mods is None else mods))

    @client.train()
    def train_handler(msg: Message, context: Context) -> Message:
        return train(runtime(context), msg, context)

    @client.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        return evaluate(runtime(context), msg, context)

    @client.query()
    def query_handler(msg: Message, context: Context) -> Message:
        return query(runtime, msg, context)

    return client


app = build_client_app()
