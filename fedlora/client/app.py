"""The ClientApp: what each site runs for every message from the coordinator.

Train: set the global adapter, train locally, reply with the update
(local - global) and the site's weight. Evaluate: score the global adapter on
the site's held-out rows and reply with sums the server pools exactly.
Only trainable adapter tensors (and a task head) ever leave the site.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import compression, wire
from fedlora.arrays import State, from_record, to_record
from fedlora.client import secure
from fedlora.client.runtime import SiteRuntime, site_runtime
from fedlora.client.site_strategy import SitePlan
from fedlora.privacy.site_train import BudgetExhausted, dp_enabled, train_privately
from fedlora.training import evaluate_counts, local_train

log = logging.getLogger(__name__)
app = ClientApp()
RESIDUAL = "fedlora-compression-residual"  # context.state: what earlier compressed uploads lost


class BaseModelMismatch(RuntimeError):
    pass


def _set_global(rt: SiteRuntime, msg: Message, plan: SitePlan) -> dict:
    expected = msg.content[wire.CONFIG].get(wire.BASE_FINGERPRINT, "")
    if expected and expected != rt.loaded.fingerprint:
        raise BaseModelMismatch(
            f"site {rt.data.name}: base model weights differ from the coordinator's "
            f"(fingerprint {rt.loaded.fingerprint} != {expected}); check model.name and its files")
    return plan.start(msg)  # base correction, site rank, the site's own B (see site_strategy)


def _compress(rt: SiteRuntime, context: Context, delta: State) -> State:
    """The update as [compression] encodes it; with error feedback, the residual of earlier
    rounds is added first and the new one kept in the node's context state (never sent)."""
    z = rt.config.compression
    if z.method == "none":  # the config refuses compression with secure aggregation (dense masks)
        return delta
    if not (z.error_feedback and z.method in compression.FEEDBACK_METHODS):
        return compression.encode(delta, z.method, z.topk_fraction)
    residual = from_record(context.state[RESIDUAL]) if RESIDUAL in context.state else {}
    encoded, residual = compression.encode_with_feedback(delta, residual, z.method, z.topk_fraction)
    context.state[RESIDUAL] = to_record(residual)
    return encoded


def _site_record(rt: SiteRuntime) -> ConfigRecord:
    return ConfigRecord({wire.SITE_NAME: rt.data.name, wire.SKIPPED_ROWS: len(rt.data.skipped)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    rt = site_runtime(context)
    plan = SitePlan.for_message(rt, msg, context)
    global_state = _set_global(rt, msg, plan)
    server_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
    seed = rt.config.train.seed * 1_000_003 + rt.site_index * 10_007 + server_round
    private = None
    with plan.training(global_state) as extra_loss:  # FFA freezes A; FedProx adds its term
        if dp_enabled(rt.config, context.node_config):
            try:  # DP-SGD; the spend is on the site's disk before this reply is built
                private = train_privately(rt, context.node_config, server_round, seed, str(context.run_id),
                                          extra_loss=extra_loss, examples=plan.examples())
            except BudgetExhausted as err:
                log.warning("%s", err)
                return Message(Error(code=wire.BUDGET_EXHAUSTED, reason=str(err)), reply_to=msg)
            result = private.result
        else:
            result = local_train(rt.loaded.model, rt.task, plan.examples(), rt.config.train, rt.pad_id, seed,
                                 extra_loss=extra_loss)
    delta = plan.update(global_state)
    upload = _compress(rt, context, delta)  # [compression]; the update itself when off
    log.info("site %s round %d: %d steps, loss %.4f, %.1fs", rt.data.name, server_round,
             result.steps, result.mean_loss, result.seconds)
    metrics = MetricRecord({
        wire.NUM_EXAMPLES: len(rt.train_examples),
        wire.TRAIN_LOSS: result.mean_loss,
        wire.TRAIN_SECONDS: result.seconds,
        wire.LOCAL_STEPS: result.steps,
        wire.LORA_RANK: rt.rank,
    })
    content = RecordDict({wire.ARRAYS: to_record(upload), wire.METRICS: metrics, wire.SITE: _site_record(rt)})
    if private is not None:  # the loss is data-dependent and not noised: it stays at the site
        del metrics[wire.TRAIN_LOSS]
        metrics.update(private.metrics)
        content[wire.PRIVACY] = ConfigRecord(private.record)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    rt = site_runtime(context)
    _set_global(rt, msg, SitePlan.for_message(rt, msg, context))
    counts = evaluate_counts(rt.loaded.model, rt.task, rt.eval_examples, rt.pad_id) if rt.eval_examples else {}
    metrics = MetricRecord({
        wire.EVAL_COUNT: int(counts.get("count", 0)),
        wire.EVAL_LOSS_SUM: float(counts.get("loss_sum", 0.0)),
        wire.EVAL_TOKENS: int(counts.get("tokens", 0)),
        wire.EVAL_CORRECT: int(counts.get("correct", 0)),
        wire.EVAL_TP: counts.get("tp", []),
        wire.EVAL_FP: counts.get("fp", []),
        wire.EVAL_FN: counts.get("fn", []),
    })
    return Message(RecordDict({wire.METRICS: metrics, wire.SITE: _site_record(rt)}), reply_to=msg)


# Secure aggregation (secagg.enabled): message types train.secagg_<stage>, handled in
# client/secure.py; its masked-input stage trains through `train` above.
secure.register(app, train)
