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
from fedlora.client import review
from fedlora.client.drift import (
    TRAINED_IN_RUN,
    load_snapshot,
    record_accuracy,
    record_training,
    shares_drift,
    site_folder,
    snapshot_digest,
)
from fedlora.client.drift import answer as drift_answer
from fedlora.client.mods import compression_mod, site_errors_mod
from fedlora.client.runtime import (
    BaseModelMismatch,
    SiteRuntime,
    site_config,
    site_runtime,
)
from fedlora.client.secure import durable_folder, secure_aggregation_mod
from fedlora.client.site_strategy import SitePlan
from fedlora.data.drift import profile
from fedlora.data.readers import read_rows
from fedlora.privacy import forecast
from fedlora.privacy.distributed_site import forecast_releases, site_accounts
from fedlora.privacy.site_train import (
    BudgetExhausted,
    dp_enabled,
    forecast_privately,
    train_privately,
)
from fedlora.tasks import build_task
from fedlora.tasks.causal_lm import prompt_tail
from fedlora.tasks.generation import greedy_completions
from fedlora.training import evaluate_counts, plain_train, predict_labels, site_seed

log = logging.getLogger(__name__)
REVIEW_NEW_TOKENS = 64  # a language model's completion for review, when task.generate-max-tokens is 0

Runtime = Callable[[Context], SiteRuntime]
SITE_MODS = [site_errors_mod, secure_aggregation_mod, compression_mod]  # outermost first


def _set_global(rt: SiteRuntime, msg: Message, plan: SitePlan) -> dict:
    expected = msg.content[wire.CONFIG].get(wire.BASE_FINGERPRINT, "")
    if expected and expected != rt.loaded.fingerprint:
        raise BaseModelMismatch(
            f"site {rt.data.name}: base model weights differ from the coordinator's "
            f"(fingerprint {rt.loaded.fingerprint} != {expected}); check model.name and its files, and that "
            "train.precision and model.quantization agree (a 4-bit base must be quantized on the same kind of "
            "device everywhere)")
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
    digest = _snapshot_training(rt, context)
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
    site = _site_record(rt)
    if digest and shares_drift(context.node_config):  # it tells when the site's data changed: opt-in only
        site[wire.DATA_SNAPSHOT] = digest
    content = RecordDict({wire.ARRAYS: to_record(delta), wire.METRICS: metrics, wire.SITE: site})
    if private is not None or rt.config.privacy.client_dp:  # data-dependent, not noised: it stays here
        del metrics[wire.TRAIN_LOSS]
    if private is not None:
        metrics.update(private.metrics)
        content[wire.PRIVACY] = ConfigRecord(private.record)
    return Message(content, reply_to=msg)


def evaluate(rt: SiteRuntime, msg: Message, context: Context) -> Message:
    _set_global(rt, msg, SitePlan.for_message(rt, msg, context))
    counts = (evaluate_counts(rt.loaded.model, rt.task, rt.eval_examples, rt.pad_id, tokenizer=rt.loaded.tokenizer,
                              precision=rt.config.train.precision)
              if rt.eval_examples else {})  # the tokenizer: what a causal LM generates is scored too
    metrics = MetricRecord({key: _eval_value(counts.get(name), kind) for key, (name, kind) in wire.EVAL_COUNTS.items()})
    _record_accuracy(rt, counts, context)
    _keep_for_review(rt, msg.content[wire.CONFIG], context)
    return Message(RecordDict({wire.METRICS: metrics, wire.SITE: _site_record(rt)}), reply_to=msg)


def _keep_for_review(rt: SiteRuntime, config: ConfigRecord, context: Context) -> None:
    """In an evaluation-only run, the model's outputs on the first held-out rows, kept at the site for its
    expert's blind review (client/review.py); kept once per pair of models, so verdicts stay valid."""
    pair, role, rows = config.get(wire.REVIEW_PAIR), config.get(wire.REVIEW_ROLE), int(config.get(wire.REVIEW_ROWS, 0))
    folder = site_folder(rt.config, context.node_config, rt.data.name)
    if not pair or not rows or folder is None:
        return
    try:
        if review.has_outputs(folder, str(pair), str(role)):
            return
        chosen = rt.data.eval[:rows]
        review.keep_outputs(folder, str(pair), str(role),
                            *_model_outputs(rt.loaded.model, rt.task, chosen, rt.loaded.tokenizer,
                                            rt.config.model.max_length, rt.config.train.precision))
    except Exception as err:  # the review is extra: the evaluation reply must still go
        log.warning("site %s: could not keep outputs for review (%s)", rt.data.name, type(err).__name__)


def _model_outputs(model, task, rows: list[dict], tokenizer, max_length: int,
                   precision: str = "fp32") -> tuple[list[str], list[str]]:
    """What the model in `model` says for each row: (the text the expert reads, the model's output). A
    classifier's output is the label name it predicts for the row's text; a language model's, the
    completion it generates greedily for the row's prompt."""
    if not rows:
        return [], []
    pad_id = tokenizer.pad_token_id
    if hasattr(task, "predict"):
        predicted = predict_labels(model, task, task.encode(rows, tokenizer, max_length), pad_id, precision=precision)
        return [str(row[task.text_column]) for row in rows], [task.labels[i] for i in predicted]
    prompts = [task.split(row, tokenizer)[0] for row in rows]
    new_tokens = getattr(task, "generate_max_tokens", 0) or REVIEW_NEW_TOKENS
    ids = [prompt_tail(tokenizer(p, add_special_tokens=False)["input_ids"], max_length, new_tokens) for p in prompts]
    completions = greedy_completions(model, ids, tokenizer, new_tokens)
    return prompts, [tokenizer.decode(c, skip_special_tokens=True) for c in completions]


def review_query(rt_of: Runtime, msg: Message, context: Context) -> Message:
    """The counts of this site's expert's verdicts on two models (client/review.py), if it holds them;
    nothing else. (The site's runtime names its state folder; its evaluation comes next anyway.)"""
    rt = rt_of(context)
    folder = site_folder(rt.config, context.node_config, rt.data.name)
    counts = None
    if folder is not None:
        try:
            counts = review.counts(folder, str(msg.content[wire.CONFIG][wire.REVIEW_PAIR]))
        except review.ReviewError:
            counts = None
    records = {wire.REVIEW: MetricRecord(counts)} if counts is not None else {}
    return Message(RecordDict({**records, wire.SITE: _site_record(rt)}), reply_to=msg)


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


def _columns(task) -> tuple[str, str | None]:
    return getattr(task, "text_column", "text"), getattr(task, "label_column", None)


def _snapshot_training(rt: SiteRuntime, context: Context) -> str | None:
    """Keep, at the site, aggregate statistics of the rows it trains on (client/drift.py); their keyed
    digest, which may name the snapshot upstream (the model registry's lineage). A failure to write
    them is logged and does not stop training."""
    folder = site_folder(rt.config, context.node_config, rt.data.name)
    if folder is None:
        return None
    try:
        record_training(folder, [*rt.data.train, *rt.data.eval], *_columns(rt.task))
        context.state[TRAINED_IN_RUN] = ConfigRecord({"trained": True})
        return snapshot_digest(folder)
    except (OSError, ValueError) as err:  # a disk error, an unreadable snapshot or key: training goes on
        log.warning("site %s: could not write its training snapshot in %s: %s", rt.data.name, folder, err)
        return None


def _record_accuracy(rt: SiteRuntime, counts: dict, context: Context) -> None:
    """The global adapter's accuracy on the held-out rows, beside the training snapshot: only in a run
    this site trained in (an evaluation-only run, or one it sat out, scores a model it did not train)."""
    folder = site_folder(rt.config, context.node_config, rt.data.name)
    if folder is None or "correct" not in counts or TRAINED_IN_RUN not in context.state:
        return
    try:
        record_accuracy(folder, int(counts["correct"]), int(counts.get("count", 0)))
    except OSError as err:
        log.warning("site %s: could not record its accuracy in %s: %s", rt.data.name, folder, err)


def drift_query(rt_of: Runtime, msg: Message, context: Context) -> Message:
    """The site's drift figures against its last training snapshot (client/drift.py), only when its
    node config says share-drift = true: aggregate figures, rounded, and the snapshot's keyed digest;
    no record count, word or label. A deployed site reads its data file afresh and as it is, with no
    model and no check against the run's labels: a label the run never listed is drift to report."""
    node = context.node_config
    if not shares_drift(node):
        return Message(Error(code=wire.DRIFT_NOT_SHARED, reason="this site does not share drift figures "
                                                                "(node config share-drift)"), reply_to=msg)
    if "data-path" in node:
        config = site_config(context)
        name, (text_column, label_column) = str(node.get("site", "site")), _columns(build_task(config))
        data = read_rows(str(node["data-path"]), lambda row: None, skip_bad_rows=True)
        rows, site = data.rows, ConfigRecord({wire.SITE_NAME: name, wire.SKIPPED_ROWS: len(data.skipped)})
    else:
        rt = rt_of(context)
        config, name, (text_column, label_column) = rt.config, rt.data.name, _columns(rt.task)
        rows, site = [*rt.data.train, *rt.data.eval], _site_record(rt)
    folder = site_folder(config, node, name)
    snapshot = load_snapshot(folder) if folder is not None else None
    records = {wire.DRIFT: MetricRecord(drift_answer(snapshot, profile(rows, text_column, label_column)))}
    if snapshot is not None:
        records[wire.DRIFT_SNAPSHOT] = ConfigRecord({wire.DRIFT_DIGEST: snapshot_digest(folder)})
    return Message(RecordDict({**records, wire.SITE: site}), reply_to=msg)


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

    @client.query(wire.DRIFT_QUERY)
    def drift_handler(msg: Message, context: Context) -> Message:
        return drift_query(runtime, msg, context)

    @client.query(wire.REVIEW_QUERY)
    def review_handler(msg: Message, context: Context) -> Message:
        return review_query(runtime, msg, context)

    return client


app = build_client_app()
