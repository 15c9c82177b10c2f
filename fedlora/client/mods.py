"""Site-side features as Flower ClientApp mods: each wraps every handler of the ClientApp.

`compression_mod` encodes the update a train reply carries ([compression]);
with error feedback, what earlier uploads lost (the residual) is added to the
update first and the new residual kept in the node's context state, never sent.
Secure aggregation's mod is in client/secure.py.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedlora import compression, wire
from fedlora.arrays import from_record, to_record
from fedlora.client.runtime import site_config

RESIDUAL = "fedlora-compression-residual"  # context.state: what earlier compressed uploads lost


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
