"""Server side of the protocol: routes payloads, tracks dropouts, rebuilds the sum.

Each stage method takes the replies that arrived for the previous stage
(``{node_id: payload}``; a missing client is a dropout) and returns the next
requests (``{node_id: payload}``). A reply that is malformed or belongs to
another session is logged and treated as a dropout. The server is trusted to
be honest-but-curious: it never sees a private key, seed or share in clear
except the shares it needs to remove masks, and it never gets both shares of
one client from an honest client.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from . import keys, shamir
from . import messages as m
from .config import SecAggConfig
from .encoding import Quantizer, unpack
from .errors import ProtocolViolation, SecAggAbort, SecAggConfigError, ShareVerificationError
from .graph import neighbour_graph
from .prg import apply_mask

log = logging.getLogger(__name__)

_CIPHERTEXT_BYTES = keys.NONCE_BYTES + 2 * shamir.SHARE_BYTES + keys.TAG_BYTES


@dataclass(frozen=True)
class SecAggResult:
    """Outcome of a round: the sum of the included clients' (clipped, quantized) vectors."""

    sum: np.ndarray       # float64
    included: tuple[int, ...]   # clients whose inputs are in the sum
    dropped: tuple[int, ...]    # participants whose inputs are not
    max_error: float      # bound on |sum - exact sum of clipped inputs| per coordinate

    @property
    def num_clients(self) -> int:
        return len(self.included)

    def mean(self) -> np.ndarray:
        return self.sum / self.num_clients


class SecAggServer:
    """Server state of one session (a round) over fixed participants."""

    def __init__(
        self,
        participants: Sequence[int],
        config: SecAggConfig | None = None,
        *,
        vector_length: int | None = None,
        session_id: bytes | None = None,
        graph_seed: bytes | None = None,
    ) -> None:
        ids = sorted(int(i) for i in participants)
        if len(set(ids)) != len(ids):
            raise SecAggConfigError("participant ids must be distinct")
        if len({shamir.share_x(i) for i in ids}) != len(ids):
            raise SecAggConfigError("participant ids collide as 64-bit values")
        self.participants = ids
        self.config = config or SecAggConfig()
        self.params = self.config.resolve(len(ids))
        self.vector_length = vector_length
        self.session_id = session_id if session_id is not None else os.urandom(32)
        if len(self.session_id) < 16:
            raise SecAggConfigError("session_id must be at least 16 bytes")
        self.graph_seed = graph_seed if graph_seed is not None else os.urandom(32)
        graph = neighbour_graph(ids, self.params.degree, self.graph_seed)
        self.graph = {i: frozenset(js) for i, js in graph.items()}
        self.stage = ""
        self._enc_pk: dict[int, bytes] = {}
        self._mask_pk: dict[int, bytes] = {}
        self._commitment: dict[int, bytes] = {}
        self._keys_sent: dict[int, list[int]] = {}   # U1: neighbours whose keys each client got
        self._partners: dict[int, list[int]] = {}    # U2: neighbours each client masks with
        self._cts: dict[int, dict[int, bytes]] = {}  # sender -> receiver -> ciphertext
        self._included: list[int] = []               # U3: masked inputs received
        self._requested: dict[int, tuple[list[int], list[int]]] = {}
        self._held_by: dict[int, list[int]] = {}     # client -> survivors holding its shares
        self._total: np.ndarray | None = None

    @property
    def threshold(self) -> int:
        return self.params.threshold

    @property
    def quantizer(self) -> Quantizer:
        return self.params.quantizer

    # ----------------------------------------------------------------- stages
    def setup_requests(self) -> dict[int, dict[str, Any]]:
        """Stage 1 requests (identical for all): parameters; clients answer with public keys."""
        self._advance("", m.SETUP)
        q = self.quantizer
        body = {
            m.PROTOCOL_NAME: m.PROTOCOL,
            m.PARTICIPANTS: list(self.participants),
            m.THRESHOLD: self.threshold,
            m.DEGREE: self.params.degree,
            m.GRAPH_SEED: self.graph_seed,
            m.CLIP_RANGE: float(q.clip_range),
            m.BITS: q.bits,
            m.MODULUS_BITS: q.modulus_bits,
        }
        return {i: self._request(m.SETUP, dict(body)) for i in self.participants}

    def share_keys_requests(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Stage 2: relay each client's neighbours' public keys."""
        self._advance(m.SETUP, m.SHARE_KEYS)
        valid = {}
        for i, reply in self._replies(replies, self.participants, m.SETUP):
            fields = (reply.get(m.ENC_PUBLIC_KEY), reply.get(m.MASK_PUBLIC_KEY), reply.get(m.SEED_COMMITMENT))
            if all(isinstance(f, bytes) and len(f) == keys.KEY_BYTES for f in fields):
                valid[i] = fields
            else:
                log.warning("secagg: malformed key advertisement from client %d; treating it as dropped", i)
        # Two clients with one key would let one derive the other's masks: drop both.
        seen: dict[bytes, int] = {}
        for i, (enc_pk, mask_pk, _) in sorted(valid.items()):
            for pk in (enc_pk, mask_pk):
                seen[pk] = seen.get(pk, 0) + 1
        for i in [i for i, (e, mk, _) in valid.items() if seen[e] > 1 or seen[mk] > 1 or e == mk]:
            log.warning("secagg: client %d advertised a reused public key; treating it as dropped", i)
            del valid[i]
        for i, (enc_pk, mask_pk, commitment) in valid.items():
            self._enc_pk[i], self._mask_pk[i], self._commitment[i] = enc_pk, mask_pk, commitment
        alive = self._prune(set(valid), "after key advertisement")
        requests = {}
        for i in sorted(alive):
            ids = sorted(self.graph[i] & alive)
            self._keys_sent[i] = ids
            requests[i] = self._request(
                m.SHARE_KEYS,
                {
                    m.NEIGHBOUR_IDS: ids,
                    m.ENC_PUBLIC_KEYS: [self._enc_pk[j] for j in ids],
                    m.MASK_PUBLIC_KEYS: [self._mask_pk[j] for j in ids],
                },
            )
        return requests

    def masked_input_requests(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Stage 3: route each client the share ciphertexts addressed to it."""
        self._advance(m.SHARE_KEYS, m.MASKED_INPUT)
        valid = set()
        for i, reply in self._replies(replies, self._keys_sent, m.SHARE_KEYS):
            receivers, cts = reply.get(m.RECEIVER_IDS), reply.get(m.CIPHERTEXTS)
            if (
                isinstance(receivers, list)
                and isinstance(cts, list)
                and sorted(receivers) == self._keys_sent[i]
                and len(cts) == len(receivers)
                and all(isinstance(c, bytes) and len(c) == _CIPHERTEXT_BYTES for c in cts)
            ):
                self._cts[i] = dict(zip(receivers, cts))
                valid.add(i)
            else:
                log.warning("secagg: malformed share message from client %d; treating it as dropped", i)
        alive = self._prune(valid, "after share distribution")
        requests = {}
        for i in sorted(alive):
            senders = sorted(self.graph[i] & alive)
            self._partners[i] = senders
            requests[i] = self._request(
                m.MASKED_INPUT,
                {m.SENDER_IDS: senders, m.CIPHERTEXTS: [self._cts[j][i] for j in senders]},
            )
        self._cts.clear()
        return requests

    def unmask_requests(self, replies: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
        """Stage 4: sum the masked uploads; ask survivors for the shares that remove the masks."""
        self._advance(m.MASKED_INPUT, m.UNMASK)
        q = self.quantizer
        uploads: dict[int, np.ndarray] = {}
        for i, reply in self._replies(replies, self._partners, m.MASKED_INPUT):
            data, length = reply.get(m.MASKED_VECTOR), reply.get(m.VECTOR_LENGTH)
            if (
                isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1
                and isinstance(length, int) and data.size == length * q.bytes_per_param
            ):
                uploads[i] = data
            else:
                log.warning("secagg: malformed masked input from client %d; treating it as dropped", i)
        lengths = {int(u.size) // q.bytes_per_param for u in uploads.values()}
        if self.vector_length is not None:
            for i in [i for i, u in uploads.items() if u.size != self.vector_length * q.bytes_per_param]:
                log.warning("secagg: client %d uploaded a vector of the wrong length; dropped", i)
                del uploads[i]
        elif len(lengths) > 1:
            raise ProtocolViolation(f"masked inputs have different lengths {sorted(lengths)}")

        included = sorted(uploads)
        if len(included) < self.params.min_survivors:
            raise SecAggAbort(
                f"only {len(included)} masked inputs arrived, at least {self.params.min_survivors} needed",
                available=len(included), needed=self.params.min_survivors,
            )
        survivors = set(included)
        dropped = sorted(set(self._partners) - survivors)
        # Check every secret stays recoverable before asking anyone to reveal anything.
        for target, holders, what in self._holders(survivors, dropped):
            if len(holders) < self.threshold:
                raise self._shortfall(target, len(holders), what)

        total = None
        for i in included:
            word = unpack(uploads.pop(i), q.modulus_bits)
            total = word if total is None else np.add(total, word, out=total)
        self._total, self._included = total, included

        requests = {}
        for h in included:
            neighbourhood = [h, *self._partners[h]]
            ask_seed = sorted(j for j in neighbourhood if j in survivors)
            ask_key = sorted(j for j in self._partners[h] if j not in survivors)
            self._requested[h] = (ask_seed, ask_key)
            requests[h] = self._request(m.UNMASK, {m.SURVIVOR_IDS: ask_seed, m.DROPPED_IDS: ask_key})
        return requests

    def aggregate(self, replies: Mapping[int, Mapping[str, Any]]) -> SecAggResult:
        """Final step: rebuild seeds/keys from the shares, strip the masks, decode the sum."""
        self._advance(m.UNMASK, "done")
        q = self.quantizer
        seed_points: dict[int, list[tuple[int, int]]] = {i: [] for i in self._included}
        dropped = sorted(set(self._partners) - set(self._included))
        key_points: dict[int, list[tuple[int, int]]] = {j: [] for j in dropped}
        for h, reply in self._replies(replies, self._requested, m.UNMASK):
            try:
                got_seed = _shares(reply, m.SEED_SHARE_IDS, m.SEED_SHARES)
                got_key = _shares(reply, m.KEY_SHARE_IDS, m.KEY_SHARES)
            except ValueError as err:
                log.warning("secagg: malformed unmask reply from client %d (%s); ignoring it", h, err)
                continue
            ask_seed, ask_key = self._requested[h]
            x = shamir.share_x(h)
            # Only what was asked is used: a reply can never add a second share kind.
            for i in ask_seed:
                if i in got_seed:
                    seed_points[i].append((x, got_seed[i]))
            for j in ask_key:
                if j in got_key:
                    key_points[j].append((x, got_key[j]))

        t = self.threshold
        shortfalls = [(i, len(p), "self-mask seed") for i, p in seed_points.items() if len(p) < t]
        shortfalls += [(j, len(p), "mask key") for j, p in key_points.items() if len(p) < t]
        if shortfalls:
            first = shortfalls[0]
            others = ", ".join(f"client {c}: {a}" for c, a, _ in shortfalls[1:])
            raise self._shortfall(*first, extra=f" (also short: {others})" if others else "")

        total = self._total
        for i, points in seed_points.items():
            seed = self._rebuild(points)
            if seed is None or keys.commit(seed, self.session_id, i) != self._commitment[i]:
                raise self._mismatch(i, points, "self-mask seed does not match its commitment")
            self._check_extra(i, points, "self-mask seed")
            apply_mask(total, keys.self_mask_seed(seed, self.session_id, i), subtract=True)
        for j, points in key_points.items():
            mask_sk = self._rebuild(points)
            if mask_sk is None or keys.public_from_private(mask_sk) != self._mask_pk[j]:
                raise self._mismatch(j, points, "mask key does not match the advertised public key")
            self._check_extra(j, points, "mask key")
            for h in self._held_by[j]:  # the survivors that masked with j
                shared = keys.agree(mask_sk, self._mask_pk[h])
                # h added the mask if h < j and subtracted it otherwise: undo that.
                seed = keys.pairwise_mask_seed(shared, self.session_id, h, j)
                apply_mask(total, seed, subtract=h < j)
        total &= total.dtype.type(q.modulus_mask)
        self._total = None
        included = tuple(self._included)
        return SecAggResult(
            sum=q.decode_sum(total),
            included=included,
            dropped=tuple(i for i in self.participants if i not in set(included)),
            max_error=q.max_sum_error(len(included)),
        )

    # ---------------------------------------------------------------- helpers
    def _advance(self, expected: str, new: str) -> None:
        if self.stage != expected:
            raise ProtocolViolation(
                f"server stage {new!r} called after {self.stage or 'none'!r}, "
                f"expected after {expected or 'none'!r}"
            )
        self.stage = new

    def _request(self, stage: str, body: dict[str, Any]) -> dict[str, Any]:
        return {m.STAGE: stage, m.SESSION_ID: self.session_id, **body}

    def _replies(self, replies: Mapping[int, Mapping[str, Any]], expected, stage: str):
        """Replies from clients that were asked, for this session and stage, in id order."""
        for i in sorted(replies):
            reply = replies[i]
            if i not in expected:
                log.warning("secagg: unexpected %s reply from client %d ignored", stage, i)
            elif reply.get(m.STAGE) != stage or reply.get(m.SESSION_ID) != self.session_id:
                log.warning("secagg: %s reply from client %d is for another stage or session", stage, i)
            else:
                yield i, reply

    def _prune(self, alive: set[int], when: str) -> set[int]:
        """Drop clients whose neighbourhood can no longer reach the threshold (repeat to a fixed point)."""
        alive = set(alive)
        while True:
            weak = sorted(i for i in alive if len(self.graph[i] & alive) + 1 < self.threshold)
            if not weak:
                break
            log.warning(
                "secagg: clients %s have fewer than %d live neighbours %s; excluded", weak, self.threshold, when
            )
            alive -= set(weak)
        if len(alive) < self.params.min_survivors:
            raise SecAggAbort(
                f"only {len(alive)} clients remain {when}, at least {self.params.min_survivors} needed",
                available=len(alive), needed=self.params.min_survivors,
            )
        return alive

    def _holders(self, survivors: set[int], dropped: list[int]):
        """(client, survivors holding its shares, which secret) for every secret to rebuild."""
        held_by: dict[int, list[int]] = {i: [] for i in self._partners}
        for h in sorted(survivors):
            for j in self._partners[h]:
                held_by[j].append(h)
        self._held_by = held_by
        for i in sorted(survivors):
            yield i, [i, *held_by[i]], "self-mask seed"
        for j in dropped:
            yield j, held_by[j], "mask key"

    def _shortfall(self, client: int, available: int, what: str, extra: str = "") -> SecAggAbort:
        return SecAggAbort(
            f"cannot rebuild the {what} of client {client}: {available} shares available, "
            f"{self.threshold} needed{extra}",
            client_id=client, available=available, needed=self.threshold,
        )

    def _rebuild(self, points: list[tuple[int, int]]) -> bytes | None:
        """32-byte secret from the first t shares; None if wrong shares gave a larger value."""
        value = shamir.interpolate_at(points[: self.threshold], 0)
        return value.to_bytes(32, "big") if value < 2**256 else None

    def _check_extra(self, client: int, points: list[tuple[int, int]], what: str) -> None:
        bad = shamir.find_inconsistent(points, self.threshold)
        if bad:
            holders = [self._holder_of(points[k][0]) for k in bad]
            raise ShareVerificationError(
                f"{what} shares of client {client} from client(s) {holders} are inconsistent with the others",
                client_id=client, holders=holders,
            )

    def _mismatch(self, client: int, points: list[tuple[int, int]], why: str) -> ShareVerificationError:
        holders = [self._holder_of(x) for x, _ in points[: self.threshold]]
        return ShareVerificationError(
            f"client {client}: {why}; shares came from clients {holders}, at least one is wrong",
            client_id=client, holders=holders,
        )

    def _holder_of(self, x: int) -> int:
        return next(i for i in self.participants if shamir.share_x(i) == x)


def _shares(reply: Mapping[str, Any], ids_key: str, shares_key: str) -> dict[int, int]:
    ids, shares = reply.get(ids_key), reply.get(shares_key)
    if not isinstance(ids, list) or not isinstance(shares, list) or len(ids) != len(shares):
        raise ValueError(f"{ids_key}/{shares_key} missing or not parallel lists")
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{ids_key} must be distinct ints")
    if not all(isinstance(s, bytes) for s in shares):
        raise ValueError(f"{shares_key} must hold bytes")
    return {int(i): shamir.decode_share(s) for i, s in zip(ids, shares)}
