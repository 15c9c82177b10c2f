"""Secure aggregation at a site, as a Flower ClientApp mod.

Under secure aggregation every message of a training round is a `train`
message carrying the protocol stage in its `secagg` record
(server/secure_collect.py). This mod answers the key-agreement, share and
unmask stages itself; at the masked-input stage it lets the message through
to the ordinary train handler (same model setup, strategy plan and DP-SGD
path), then uploads only the masked vector of the update. The clear part of
its reply is the non-sensitive metadata the handler produces (site name,
timings, DP-SGD epsilon), never the update, its weight or its loss. When the
run uses secure aggregation, a train message without a stage is refused: the
site never sends its update in clear.

The protocol state (private keys, self-mask seed, received shares) lives in
the node's `context.state`, never in a reply: in deployment each message may
start a fresh ClientApp process, and the SuperNode keeps the context. That
state can be replayed (a restarted SuperNode, an older copy of the context),
so the one rule a replay must not break — answer a session's unmask request
once, or a second request with another dropout list reveals both kinds of
shares of a site — is kept in the site's own durable folder too
(`secagg-unmasked.log` in its `state-dir`; in a simulation
`<output.dir>/sites/node-<id>/`), written before the answer leaves.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from flwr.app import Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedlora import wire
from fedlora.arrays import from_record
from fedlora.client.runtime import site_config
from fedlora.privacy.budget import NODE_STATE_DIR, PrivacyStateError
from fedlora.privacy.distributed_site import reserve_release, site_accounts
from fedlora.privacy.secagg import ProtocolViolation, SecAggClient
from fedlora.privacy.secagg import messages as m
from fedlora.privacy.secagg.distributed_dp import clip_and_noise, site_noise_std
from fedlora.privacy.secagg.records import RECORD, from_config_record, payload_of, payload_records, to_config_record
from fedlora.privacy.secagg.updates import LAYOUT, encode, weight_scale
from fedlora.privacy.site import BudgetExhausted, coarse_epsilon

log = logging.getLogger(__name__)

STATE = "secagg-client"  # context.state record: holds private keys, never sent
NODE_ALLOW_WEAK_THRESHOLD = "secagg-allow-weak-threshold"  # node config: accept a defeatable threshold


def stage_of(msg: Message) -> str | None:
    """The secure-aggregation stage a message asks for, or None for an ordinary message."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD not in msg.content.config_records:
        return None
    return str(msg.content.config_records[RECORD].get(m.STAGE, ""))


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    stage = stage_of(msg)
    if stage is None:
        if msg.metadata.message_type == MessageType.TRAIN and site_config(context).secagg.enabled:
            return Message(Error(code=wire.CLEAR_UPLOAD_REFUSED,
                                 reason="this run uses secure aggregation: the site sends no update in clear"),
                           reply_to=msg)
        return call_next(msg, context)
    request = payload_of(msg.content)
    client = _load(context)
    clear: dict = {}
    if stage == m.SETUP:  # the site's own node config, never the run's, may accept a weak threshold
        reply = client.advertise_keys(request, bool(context.node_config.get(NODE_ALLOW_WEAK_THRESHOLD, False)))
        refusal = _distributed_dp_refusal(msg, context, client.threshold)  # before any key leaves
        if refusal is not None:
            return refusal
    elif stage == m.SHARE_KEYS:
        reply = client.share_keys(request)
    elif stage == m.MASKED_INPUT:
        client.check_masked_input(request)  # a bad request must not cost training or DP budget
        trained = call_next(msg, context)
        if trained.has_error():  # e.g. out of DP budget: this site drops out of the round
            return trained
        vector = _site_vector(msg, trained, context, client.threshold)
        reply = client.masked_input(request, vector)
        clear = {name: record for name, record in trained.content.items() if name != wire.ARRAYS}
        clear[wire.METRICS] = _clear_metrics(trained)
    else:
        _answer_unmask_once(durable_folder(context), request[m.SESSION_ID])
        reply = client.unmask(request)
    context.state[STATE] = to_config_record(client.state_dict())
    return Message(RecordDict({**payload_records(reply), **clear}), reply_to=msg)


UNMASK_RECORD = "secagg-unmasked.log"  # the sessions whose unmask request this site answered


def durable_folder(context: Context) -> Path:
    """The site's own persistent folder: its node config's state-dir (a simulated site: one under the
    run directory); a deployed site without one cannot keep the rule across restarts, and refuses."""
    if context.node_config.get(NODE_STATE_DIR):
        return Path(str(context.node_config[NODE_STATE_DIR])).expanduser()
    output = site_config(context).output.dir
    if "partition-id" in context.node_config and output:
        return Path(output).expanduser() / "sites" / f"node-{context.node_id}"
    raise PrivacyStateError(f"secure aggregation needs a folder on the site's persistent disk to record the "
                            f"sessions it unmasked; set node config {NODE_STATE_DIR}=\"/path\"")


def _answer_unmask_once(folder: Path, session_id: bytes) -> None:
    """Record, durably and before answering, that this session's unmask request is answered;
    refuse if it already was (across processes, restarts and replayed context states)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / UNMASK_RECORD).open("a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        if session_id.hex() in fh.read().split():
            raise ProtocolViolation("this site already answered the unmask request of this session (its durable "
                                    "record says so); refusing a second one, whatever its state says")
        fh.write(session_id.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _distributed_dp_refusal(msg: Message, context: Context, threshold: int) -> Message | None:
    """Under distributed DP (or when the site demands it), the site's own floor and budget decide at
    setup, and the round is in its ledger before it trains; an error reply when it refuses."""
    config, node = site_config(context), context.node_config
    sigma = config.secagg.dp_noise_multiplier
    if not site_accounts(config.secagg, node):
        return None
    try:
        reserve_release(durable_folder(context), node, config.privacy.epsilon,
                        str(node.get("site", f"node-{context.node_id}")),
                        int(msg.content[wire.CONFIG][wire.SERVER_ROUND]), sigma, config.secagg.dp_clip, threshold,
                        run=str(context.run_id))
    except BudgetExhausted as err:
        log.warning("%s", err)
        return Message(Error(code=wire.BUDGET_EXHAUSTED, reason=str(err)), reply_to=msg)
    return None


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


# Masked, or never sent under secure aggregation: the weight and the loss travel inside the masked
# vector; the DP-SGD sampling rate, the local steps and the noise multiplier (calibrated from them) would
# give away the site's record count that masking the weight hides.
HIDDEN_UNDER_SECAGG = frozenset({wire.NUM_EXAMPLES, wire.TRAIN_LOSS, wire.DP_SAMPLE_RATE, wire.LOCAL_STEPS,
                                 wire.DP_NOISE_MULTIPLIER})


# Sent in clear, but rounded up to a tenth: with a fixed sigma, an exact epsilon would pin down the
# sampling rate, and so the record count, as well as the rate itself would.
COARSE_UNDER_SECAGG = frozenset({wire.DP_EPSILON, wire.DP_EPSILON_RDP, wire.DP_RUN_EPSILON})


def _clear_metrics(trained: Message) -> MetricRecord:
    """The training metrics that may travel in clear (HIDDEN_UNDER_SECAGG never does)."""
    return MetricRecord({k: coarse_epsilon(v) if k in COARSE_UNDER_SECAGG else v
                         for k, v in trained.content[wire.METRICS].items() if k not in HIDDEN_UNDER_SECAGG})
