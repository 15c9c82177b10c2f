"""Keys and stage names of the secure-aggregation messages, shared by both sides.

Every payload is a ``dict[str, ...]`` whose values are int, float, str, bytes
or lists of one of them (fit a Flower ``ConfigRecord``), except the keys in
``ARRAY_KEYS``, whose values are numpy arrays (fit an ``ArrayRecord``).
Every request and reply carries ``STAGE`` and ``SESSION_ID``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

PROTOCOL = "fedlora-secagg-v1"

# Stages, in order. A reply carries the stage of the request it answers.
SETUP = "setup"                # server: parameters     -> client: public keys + commitment
SHARE_KEYS = "share-keys"      # server: neighbour keys  -> client: encrypted shares
MASKED_INPUT = "masked-input"  # server: shares for you  -> client: masked vector
UNMASK = "unmask"              # server: who dropped     -> client: shares to reveal
STAGES = (SETUP, SHARE_KEYS, MASKED_INPUT, UNMASK)

# In every message.
STAGE = "secagg-stage"                 # str
SESSION_ID = "secagg-session-id"       # bytes, fresh per round

# SETUP request.
PROTOCOL_NAME = "secagg-protocol"      # str, PROTOCOL
PARTICIPANTS = "secagg-participants"   # list[int]
THRESHOLD = "secagg-threshold"         # int, shares needed to rebuild a secret
DEGREE = "secagg-degree"               # int, neighbours per client
GRAPH_SEED = "secagg-graph-seed"       # bytes
CLIP_RANGE = "secagg-clip-range"       # float
BITS = "secagg-bits"                   # int
MODULUS_BITS = "secagg-modulus-bits"   # int
# SETUP reply.
ENC_PUBLIC_KEY = "secagg-enc-pk"       # bytes (32), X25519 key for share encryption
MASK_PUBLIC_KEY = "secagg-mask-pk"     # bytes (32), X25519 key for pairwise masks
SEED_COMMITMENT = "secagg-b-commit"    # bytes (32), SHA-256 commitment to the self-mask seed

# SHARE_KEYS request (neighbours that advertised keys, self excluded).
NEIGHBOUR_IDS = "secagg-neighbour-ids"  # list[int]
ENC_PUBLIC_KEYS = "secagg-enc-pks"      # list[bytes], parallel to NEIGHBOUR_IDS
MASK_PUBLIC_KEYS = "secagg-mask-pks"    # list[bytes], parallel to NEIGHBOUR_IDS
# SHARE_KEYS reply.
RECEIVER_IDS = "secagg-receiver-ids"    # list[int]
CIPHERTEXTS = "secagg-ciphertexts"      # list[bytes], parallel to RECEIVER_IDS / SENDER_IDS

# MASKED_INPUT request: the ciphertexts addressed to this client.
SENDER_IDS = "secagg-sender-ids"        # list[int]; CIPHERTEXTS parallel to it
# MASKED_INPUT reply.
MASKED_VECTOR = "secagg-masked"         # np.ndarray uint8, packed (ARRAY_KEYS)
VECTOR_LENGTH = "secagg-vector-length"  # int, parameters in the packed vector

# UNMASK request.
SURVIVOR_IDS = "secagg-survivor-ids"    # list[int], reveal self-mask shares of these
DROPPED_IDS = "secagg-dropped-ids"      # list[int], reveal mask-key shares of these
# UNMASK reply.
SEED_SHARE_IDS = "secagg-b-share-ids"   # list[int], owners of the shares below
SEED_SHARES = "secagg-b-shares"         # list[bytes] (66 each)
KEY_SHARE_IDS = "secagg-sk-share-ids"   # list[int]
KEY_SHARES = "secagg-sk-shares"         # list[bytes] (66 each)

ARRAY_KEYS = frozenset({MASKED_VECTOR})

_SCALARS = (bool, int, float, str, bytes)


def split_payload(payload: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Split a payload into (ConfigRecord-ready values, ArrayRecord-ready arrays)."""
    config = {k: v for k, v in payload.items() if k not in ARRAY_KEYS}
    arrays = {k: v for k, v in payload.items() if k in ARRAY_KEYS}
    return config, arrays


def check_wire_types(payload: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` unless the payload fits Flower's Config/ArrayRecord types."""
    for key, value in payload.items():
        if not isinstance(key, str):
            raise TypeError(f"payload key {key!r} is not a str")
        if key in ARRAY_KEYS:
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{key} must be a numpy array, got {type(value).__name__}")
        elif isinstance(value, list):
            kinds = {type(v) for v in value}
            if len(kinds) > 1 or not all(isinstance(v, _SCALARS) for v in value):
                raise TypeError(f"{key} must be a homogeneous list of scalars")
        elif not isinstance(value, _SCALARS):
            raise TypeError(f"{key} has unsupported type {type(value).__name__}")
