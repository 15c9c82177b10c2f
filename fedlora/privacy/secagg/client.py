"""Client side of the protocol: one method per stage, plain-data messages in and out.

The client keeps its secrets (two X25519 private keys, the self-mask seed b)
and the shares it was sent; it sees other clients only through the payloads
the server routes. Its whole state round-trips through ``state_dict()`` /
``from_state_dict()`` so a fresh process per message (Flower deployment) can
resume it; that state holds secrets and must stay on the node.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from . import keys, shamir
from . import messages as m
from .config import MIN_CLIENTS
from .encoding import Quantizer, pack
from .errors import ProtocolViolation, SecAggAbort, SecAggConfigError, ShareDecryptionError
from .graph import effective_degree, neighbour_graph, weak_threshold_problem
from .prg import apply_mask

_SHARE_PAIR_BYTES = 2 * shamir.SHARE_BYTES
_STATE_FIELDS = (
    "node_id", "stage", "session_id", "participants", "threshold", "degree", "graph_seed",
    "clip_range", "bits", "modulus_bits", "neighbours", "enc_sk", "mask_sk", "seed",
    "own_seed_share", "peer_ids", "peer_enc_pks", "peer_mask_pks",
    "partner_ids", "partner_seed_shares", "partner_key_shares",
)


class SecAggClient:
    """One client's protocol state for one session (a round)."""

    def __init__(self, node_id: int) -> None:
        shamir.share_x(node_id)  # validates the 64-bit range
        self.node_id = int(node_id)
        self._reset()

    def _reset(self) -> None:
        self.stage = ""  # last stage answered
        self.session_id = b""
        self.participants: list[int] = []
        self.threshold = 0
        self.degree = 0
        self.graph_seed = b""
        self.clip_range = 0.0
        self.bits = 0
        self.modulus_bits = 0
        self.neighbours: list[int] = []
        self.enc_sk = b""
        self.mask_sk = b""
        self.seed = b""  # b, the self-mask secret
        self.own_seed_share = b""
        self.peer_ids: list[int] = []  # neighbours whose keys the server relayed
        self.peer_enc_pks: list[bytes] = []
        self.peer_mask_pks: list[bytes] = []
        self.partner_ids: list[int] = []  # neighbours that sent shares: masks are shared with them
        self.partner_seed_shares: list[bytes] = []
        self.partner_key_shares: list[bytes] = []

    # ----------------------------------------------------------------- stages
    def advertise_keys(self, request: Mapping[str, Any], allow_weak_threshold: bool = False) -> dict[str, Any]:
        """SETUP: check the parameters, create fresh keys and seed, publish keys + commitment.
        A threshold a coordinator could defeat is refused unless this site allows it."""
        if request.get(m.STAGE) != m.SETUP:
            raise ProtocolViolation(f"expected a {m.SETUP!r} request, got {request.get(m.STAGE)!r}")
        session_id = _get(request, m.SESSION_ID, bytes)
        if len(session_id) < 16:
            raise ProtocolViolation("session id must be at least 16 bytes")
        if session_id == self.session_id:
            raise ProtocolViolation("setup replayed for a session this client already joined")
        if request.get(m.PROTOCOL_NAME) != m.PROTOCOL:
            raise ProtocolViolation(f"unsupported protocol {request.get(m.PROTOCOL_NAME)!r}")
        participants = _int_list(request, m.PARTICIPANTS)
        threshold = _get(request, m.THRESHOLD, int)
        degree = _get(request, m.DEGREE, int)
        graph_seed = _get(request, m.GRAPH_SEED, bytes)
        try:
            quantizer = Quantizer(
                float(_get(request, m.CLIP_RANGE, (int, float))),
                _get(request, m.BITS, int),
                _get(request, m.MODULUS_BITS, int),
            )
        except SecAggConfigError as err:
            raise ProtocolViolation(f"bad quantization parameters: {err}") from err
        n = len(participants)
        if self.node_id not in participants or len(set(participants)) != n:
            raise ProtocolViolation("participant list is not distinct or does not include this client")
        if n < MIN_CLIENTS:
            raise ProtocolViolation(f"refusing a session of {n} clients (< {MIN_CLIENTS})")
        if degree < 2 or effective_degree(n, degree) != degree:
            raise ProtocolViolation(f"degree {degree} is not valid for {n} clients")
        if not 2 <= threshold <= degree + 1:
            raise ProtocolViolation(f"threshold {threshold} outside [2, degree + 1 = {degree + 1}]")
        weak = weak_threshold_problem(threshold, degree)
        if weak and not allow_weak_threshold:
            raise ProtocolViolation(f"refusing the session: {weak}")
        if n > quantizer.max_clients():
            raise ProtocolViolation(
                f"modulus 2^{quantizer.modulus_bits} cannot hold the sum of {n} {quantizer.bits}-bit values"
            )

        self._reset()  # forget any previous session
        self.session_id, self.participants = session_id, participants
        self.threshold, self.degree, self.graph_seed = threshold, degree, graph_seed
        self.clip_range, self.bits = quantizer.clip_range, quantizer.bits
        self.modulus_bits = quantizer.modulus_bits
        self.neighbours = list(neighbour_graph(participants, degree, graph_seed)[self.node_id])
        self.enc_sk, enc_pk = keys.generate_keypair()
        self.mask_sk, mask_pk = keys.generate_keypair()
        self.seed = os.urandom(32)
        self.stage = m.SETUP
        return self._reply(
            m.SETUP,
            {
                m.ENC_PUBLIC_KEY: enc_pk,
                m.MASK_PUBLIC_KEY: mask_pk,
                m.SEED_COMMITMENT: keys.commit(self.seed, session_id, self.node_id),
            },
        )

    def share_keys(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """SHARE_KEYS: Shamir-share b and the mask key; encrypt one share pair per neighbour."""
        self._expect(request, m.SHARE_KEYS, after=m.SETUP)
        ids = _int_list(request, m.NEIGHBOUR_IDS)
        enc_pks = _bytes_list(request, m.ENC_PUBLIC_KEYS, len(ids), keys.KEY_BYTES)
        mask_pks = _bytes_list(request, m.MASK_PUBLIC_KEYS, len(ids), keys.KEY_BYTES)
        if len(set(ids)) != len(ids) or not set(ids) <= set(self.neighbours):
            raise ProtocolViolation("neighbour list has duplicates or clients outside this neighbourhood")
        self._require_enough(len(ids) + 1, "neighbours that advertised keys")

        holders = [self.node_id, *ids]
        xs = [shamir.share_x(h) for h in holders]
        seed_shares = shamir.split(int.from_bytes(self.seed, "big"), self.threshold, xs)
        key_shares = shamir.split(int.from_bytes(self.mask_sk, "big"), self.threshold, xs)
        ciphertexts = []
        for j, enc_pk, bs, ks in zip(ids, enc_pks, seed_shares[1:], key_shares[1:]):
            shared = self._agree(self.enc_sk, enc_pk, j)
            key = keys.share_encryption_key(shared, self.session_id, self.node_id, j)
            plaintext = shamir.encode_share(bs) + shamir.encode_share(ks)
            ciphertexts.append(keys.seal(key, plaintext, keys.share_aad(self.session_id, self.node_id, j)))
        # Own share of b: revealed when this client survives. Own share of the
        # mask key is never needed (a client never answers for itself as dropped).
        self.own_seed_share = shamir.encode_share(seed_shares[0])
        self.peer_ids, self.peer_enc_pks, self.peer_mask_pks = ids, enc_pks, mask_pks
        self.stage = m.SHARE_KEYS
        return self._reply(m.SHARE_KEYS, {m.RECEIVER_IDS: list(ids), m.CIPHERTEXTS: ciphertexts})

    def check_masked_input(self, request: Mapping[str, Any]) -> None:
        """Everything ``masked_input`` checks of the request, without the vector: call it before
        computing the vector (local training spends time and privacy budget)."""
        self._received_shares(request)

    def masked_input(self, request: Mapping[str, Any], vector: np.ndarray) -> dict[str, Any]:
        """MASKED_INPUT: decrypt received shares, then upload quantized vector + masks mod 2^m."""
        senders, seed_shares, key_shares = self._received_shares(request)
        quantizer = self.quantizer
        masked = quantizer.quantize(np.asarray(vector))
        # Unsigned arrays wrap mod 2^(8*itemsize), a multiple of 2^m: reduce once at the end.
        apply_mask(masked, keys.self_mask_seed(self.seed, self.session_id, self.node_id))
        mask_pk_of = dict(zip(self.peer_ids, self.peer_mask_pks))
        for j in senders:
            shared = self._agree(self.mask_sk, mask_pk_of[j], j)
            # The lower id adds the pairwise mask, the higher subtracts it: they cancel in the sum.
            seed = keys.pairwise_mask_seed(shared, self.session_id, self.node_id, j)
            apply_mask(masked, seed, subtract=self.node_id > j)
        masked &= masked.dtype.type(quantizer.modulus_mask)

        self.partner_ids = senders
        self.partner_seed_shares, self.partner_key_shares = seed_shares, key_shares
        # The shares are with the neighbours now; this client needs its secrets no longer.
        self.enc_sk = self.mask_sk = self.seed = b""
        self.stage = m.MASKED_INPUT
        return self._reply(
            m.MASKED_INPUT,
            {m.MASKED_VECTOR: pack(masked, quantizer.modulus_bits), m.VECTOR_LENGTH: int(masked.size)},
        )

    def unmask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """UNMASK: reveal b-shares of survivors and mask-key shares of dropped neighbours.

        Answered once per session, and never with both shares of one client:
        that pair would let the server strip every mask from that client's upload.
        """
        if self.stage == m.UNMASK and request.get(m.SESSION_ID) == self.session_id:
            raise ProtocolViolation("unmask request already answered for this session; refusing a second one")
        self._expect(request, m.UNMASK, after=m.MASKED_INPUT)
        survivors = _int_list(request, m.SURVIVOR_IDS)
        dropped = _int_list(request, m.DROPPED_IDS)
        both = sorted(set(survivors) & set(dropped))
        if both:
            raise ProtocolViolation(
                f"refusing to reveal both the self-mask share and the mask-key share of client(s) {both}"
            )
        if len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
            raise ProtocolViolation("duplicate ids in the unmask request")
        if self.node_id not in survivors:
            raise ProtocolViolation("this client answers, so it must be listed among the survivors")
        unknown = sorted((set(survivors) | set(dropped)) - set(self.partner_ids) - {self.node_id})
        if unknown:
            raise ProtocolViolation(f"this client holds no shares of client(s) {unknown}")
        if len(survivors) < self.threshold:
            raise SecAggAbort(
                f"only {len(survivors)} survivors in client {self.node_id}'s neighbourhood, "
                f"{self.threshold} needed; refusing to unmask",
                client_id=self.node_id, available=len(survivors), needed=self.threshold,
            )

        seed_share_of = dict(zip(self.partner_ids, self.partner_seed_shares))
        seed_share_of[self.node_id] = self.own_seed_share
        key_share_of = dict(zip(self.partner_ids, self.partner_key_shares))
        reply = self._reply(
            m.UNMASK,
            {
                m.SEED_SHARE_IDS: list(survivors),
                m.SEED_SHARES: [seed_share_of[i] for i in survivors],
                m.KEY_SHARE_IDS: list(dropped),
                m.KEY_SHARES: [key_share_of[j] for j in dropped],
            },
        )
        self.own_seed_share = b""
        self.partner_seed_shares, self.partner_key_shares = [], []
        self.stage = m.UNMASK
        return reply

    def _received_shares(self, request: Mapping[str, Any]) -> tuple[list[int], list[bytes], list[bytes]]:
        """Validate a MASKED_INPUT request; (senders, their self-mask seed shares, mask-key shares)."""
        self._expect(request, m.MASKED_INPUT, after=m.SHARE_KEYS)
        senders = _int_list(request, m.SENDER_IDS)
        blobs = _bytes_list(request, m.CIPHERTEXTS, len(senders))
        if len(set(senders)) != len(senders) or not set(senders) <= set(self.peer_ids):
            raise ProtocolViolation("share senders have duplicates or clients whose keys were never relayed")
        self._require_enough(len(senders) + 1, "neighbours that sent shares")

        enc_pk_of = dict(zip(self.peer_ids, self.peer_enc_pks))
        seed_shares, key_shares = [], []
        for j, blob in zip(senders, blobs):
            shared = self._agree(self.enc_sk, enc_pk_of[j], j)
            key = keys.share_encryption_key(shared, self.session_id, j, self.node_id)
            plaintext = keys.open_sealed(key, blob, keys.share_aad(self.session_id, j, self.node_id))
            if plaintext is None or len(plaintext) != _SHARE_PAIR_BYTES:
                raise ShareDecryptionError(sender=j, receiver=self.node_id)
            seed_shares.append(plaintext[: shamir.SHARE_BYTES])
            key_shares.append(plaintext[shamir.SHARE_BYTES :])
        return senders, seed_shares, key_shares

    # ------------------------------------------------------------------ state
    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(self.clip_range, self.bits, self.modulus_bits)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (ConfigRecord types). Contains private keys: keep it on the node."""
        return {name: _copy(getattr(self, name)) for name in _STATE_FIELDS}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "SecAggClient":
        client = cls(int(state["node_id"]))
        for name in _STATE_FIELDS:
            setattr(client, name, _copy(state[name]))
        return client

    # ---------------------------------------------------------------- helpers
    def _expect(self, request: Mapping[str, Any], stage: str, *, after: str) -> None:
        if request.get(m.STAGE) != stage:
            raise ProtocolViolation(f"expected a {stage!r} request, got {request.get(m.STAGE)!r}")
        if request.get(m.SESSION_ID) != self.session_id or not self.session_id:
            raise ProtocolViolation(f"{stage!r} request belongs to another session")
        if self.stage != after:
            raise ProtocolViolation(
                f"{stage!r} request out of order: last stage answered was {self.stage or 'none'!r}"
            )

    def _require_enough(self, available: int, what: str) -> None:
        if available < self.threshold:
            raise SecAggAbort(
                f"client {self.node_id}: {available} {what} (self included), "
                f"threshold {self.threshold} needed",
                client_id=self.node_id, available=available, needed=self.threshold,
            )

    def _agree(self, sk: bytes, peer_pk: bytes, peer: int) -> bytes:
        try:
            return keys.agree(sk, peer_pk)
        except ValueError as err:
            raise ProtocolViolation(f"public key of client {peer} is invalid: {err}") from err

    def _reply(self, stage: str, body: dict[str, Any]) -> dict[str, Any]:
        return {m.STAGE: stage, m.SESSION_ID: self.session_id, **body}


def _get(request: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = request.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolViolation(f"{key} missing or of the wrong type")
    return value


def _int_list(request: Mapping[str, Any], key: str) -> list[int]:
    value = request.get(key)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ProtocolViolation(f"{key} must be a list of ints")
    return [int(v) for v in value]


def _bytes_list(request: Mapping[str, Any], key: str, length: int, size: int | None = None) -> list[bytes]:
    value = request.get(key)
    if not isinstance(value, list) or len(value) != length or not all(isinstance(v, bytes) for v in value):
        raise ProtocolViolation(f"{key} must be a list of {length} byte strings")
    if size is not None and any(len(v) != size for v in value):
        raise ProtocolViolation(f"every entry of {key} must be {size} bytes")
    return list(value)


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value
