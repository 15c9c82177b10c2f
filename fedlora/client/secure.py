"""Secure aggregation at a site: the four protocol stages as handlers of the fedlora ClientApp.

`register(app, train)` routes message types `train.secagg_<stage>` to one
handler per stage. The masked-input stage trains through the ordinary `train`
handler (same model setup, strategy plan and DP-SGD path), then uploads only
the masked vector of its update; the clear part of its reply is the
non-sensitive metadata `train` produces (site name, timings, DP-SGD epsilon),
never the update, its weight or its loss.

The protocol state (private keys, self-mask seed, received shares) lives in
the node's `context.state`, never in a reply: in deployment each message may
start a fresh ClientApp process, and the SuperNode keeps the context.
"""

from __future__ import annotations

import logging
from typing import Callable

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import wire
from fedlora.arrays import from_record
from fedlora.client.runtime import site_config
from fedlora.privacy.secagg import SecAggClient, messages as m
from fedlora.privacy.secagg.distributed_dp import clip_and_noise, site_noise_std
from fedlora.privacy.secagg.faults import parse_dropouts
from fedlora.privacy.secagg.records import ACTIONS, from_config_record, payload_of, payload_records, to_config_record
from fedlora.privacy.secagg.updates import LAYOUT, encode, weight_scale

log = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]
STATE = "secagg-client"      # context.state record: holds private keys, never sent
SIMULATED_DROPOUT = 4101     # error code of a reply from secagg.simulate-dropouts


def register(app: ClientApp, train: Handler) -> None:
    """Add the stage handlers to `app`; the masked-input stage trains with `train`."""
    for stage, action in ACTIONS.items():
        app.train(action=action)(_handler(stage, train))


def _handler(stage: str, train: Handler) -> Handler:
    def handle(msg: Message, context: Context) -> Message:
        server_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
        if _injected_dropout(context, stage, server_round):
            return Message(Error(code=SIMULATED_DROPOUT, reason=f"simulated dropout at {stage}"), reply_to=msg)
        request = payload_of(msg.content)
        client = _load(context)
        clear: dict = {}
        if stage == m.SETUP:
            reply = client.advertise_keys(request)
        elif stage == m.SHARE_KEYS:
            reply = client.share_keys(request)
        elif stage == m.MASKED_INPUT:
            client.check_masked_input(request)  # a bad request must not cost training or DP budget
            trained = train(msg, context)
            if trained.has_error():  # e.g. out of DP budget: this site drops out of the round
                return trained
            vector = _site_vector(msg, trained, context, client.threshold)
            reply = client.masked_input(request, vector)
            clear = {name: record for name, record in trained.content.items() if name != wire.ARRAYS}
            clear[wire.METRICS] = _clear_metrics(trained)
        else:
            reply = client.unmask(request)
        context.state[STATE] = to_config_record(client.state_dict())
        return Message(RecordDict({**payload_records(reply), **clear}), reply_to=msg)

    handle.__name__ = f"secagg_{stage.replace('-', '_')}"
    return handle


def _load(context: Context) -> SecAggClient:
    if STATE in context.state.config_records:
        return SecAggClient.from_state_dict(from_config_record(context.state.config_records[STATE]))
    return SecAggClient(context.node_id)


def _site_vector(msg: Message, trained: Message, context: Context, threshold: int):
    """The vector this site masks: its (DP-noised, or weight-scaled) update and the extras."""
    s = site_config(context).secagg
    site = str(trained.content[wire.SITE][wire.SITE_NAME])
    names = list(msg.content[wire.CONFIG][LAYOUT])
    delta = from_record(trained.content[wire.ARRAYS])
    sent = from_record(msg.content[wire.ARRAYS])
    wrong = [k for k in names if k in sent and k in delta and delta[k].shape != sent[k].shape]
    if wrong:
        raise ValueError(f"site {site}: update tensors {wrong[:3]} do not have the global adapter's shape")
    metrics = trained.content[wire.METRICS]
    if s.dp_noise_multiplier > 0:  # distributed DP: weight 1, no loss, clipped and noised here
        delta, norm = clip_and_noise(delta, s.dp_clip, site_noise_std(s.dp_noise_multiplier, s.dp_clip, threshold))
        log.info("site %s: update norm %.4g clipped to %.4g and noised (distributed DP)", site, norm, s.dp_clip)
        scale, loss = 1.0, None
    else:
        weight = float(metrics[wire.NUM_EXAMPLES])
        if weight > s.max_weight:
            log.warning("site %s: weight %g exceeds secagg.max-weight %g and counts as %g", site, weight,
                        s.max_weight, s.max_weight)
        scale, loss = weight_scale(weight, s.max_weight), metrics.get(wire.TRAIN_LOSS)
    encoded = encode(delta, names, scale, loss, s.clip_range)
    if encoded.clipped:  # only the site knows: the coordinator never sees the values
        log.warning("site %s: %d coordinates exceed secagg.clip-range %g and are clipped; raise it",
                    site, encoded.clipped, s.clip_range)
    return encoded.vector


def _clear_metrics(trained: Message) -> MetricRecord:
    """The training metrics that may travel in clear: not the weight or the loss (they are masked)."""
    hidden = {wire.NUM_EXAMPLES, wire.TRAIN_LOSS}
    return MetricRecord({k: v for k, v in trained.content[wire.METRICS].items() if k not in hidden})


def _injected_dropout(context: Context, stage: str, server_round: int) -> bool:
    """secagg.simulate-dropouts: simulated sites only (a deployed site has no partition id)."""
    text = str(context.run_config.get("secagg.simulate-dropouts", ""))
    if not text or "partition-id" not in context.node_config:
        return False
    site = int(context.node_config["partition-id"])
    if any(d.hits(site, stage, server_round) for d in parse_dropouts(text)):
        log.warning("SIMULATED DROPOUT (secagg.simulate-dropouts): site %d fails at %s in round %d",
                    site, stage, server_round)
        return True
    return False
