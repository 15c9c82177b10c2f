"""Site-side features as Flower ClientApp mods: each wraps every handler of the ClientApp.

`site_errors_mod` keeps what a failure says at the site: an error's message
can name a local path, a line number and the row content it choked on (a
patient's name typed into a label column), so the site logs it in full and
the coordinator gets only a category and a count (plus the messages of the
few errors that are about the protocol or the configuration, never the data).

`compression_mod` encodes the update a train reply carries ([compression]);
with error feedback, what earlier uploads lost (the residual) is added to the
update first and the new residual kept in the node's context state, never sent.
Secure aggregation's mod is in client/secure.py.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedlora import compression, wire
from fedlora.arrays import from_record, to_record
from fedlora.client.runtime import BaseModelMismatch, site_config
from fedlora.config import ConfigError
from fedlora.data.readers import DataError
from fedlora.privacy.secagg import SecAggError

log = logging.getLogger(__name__)

RESIDUAL = "fedlora-compression-residual"  # context.state: what earlier compressed uploads lost

# Errors whose message is about the protocol, the configuration or the model's public weights, never
# about a record or a local path: they travel as they are.
SAFE_TO_SEND = (SecAggError, ConfigError, BaseModelMismatch)


def upstream_reason(err: Exception) -> str:
    """What the coordinator may learn of a site's error: its kind, and for data a count of bad rows."""
    kind = type(err).__name__
    if isinstance(err, SAFE_TO_SEND):
        return f"{kind}: {err}"
    if isinstance(err, DataError):
        rows = f"{err.bad_rows} unusable row(s)" if err.bad_rows else "an unusable data file"
        return f"{kind}: the site's data has {rows}; the site's own log names them"
    return f"{kind} at the site; the site's own log has the details"


def site_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Any error of this site's handlers and mods: logged here in full, an Error reply upstream."""
    try:
        return call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - every failure becomes a sanitized Error reply
        log.exception("this site could not answer a %s message", msg.metadata.message_type)
        return Message(Error(code=wire.SITE_FAILED, reason=upstream_reason(err)), reply_to=msg)


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The train reply with its update encoded as [compression] says (untouched when it says none)."""
    reply = call_next(msg, context)
    z = site_config(context).compression
    if z.method == "none" or reply.has_error() or wire.ARRAYS not in reply.content.array_records:
        return reply
    delta = from_record(reply.content[wire.ARRAYS])
    if z.error_feedback and z.method in compression.FEEDBACK_METHODS:
        residual = from_record(context.state[RESIDUAL]) if RESIDUAL in context.state else {}
        encoded, residual = compression.encode_with_feedback(delta, residual, z.method, z.topk_fraction)
        context.state[RESIDUAL] = to_record(residual)
    else:
        encoded = compression.encode(delta, z.method, z.topk_fraction)
    reply.content[wire.ARRAYS] = to_record(encoded)
    return reply
