"""Key agreement, key derivation, share encryption and commitments.

Every derived key binds the session id (fresh per round) and the two node ids,
so nothing derived in one round or for one pair is valid in another.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_DOMAIN = b"fedlora-secagg-v1"
_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


def id_bytes(node_id: int) -> bytes:
    """8-byte encoding of a node id (signed or unsigned 64-bit)."""
    return (node_id % 2**64).to_bytes(8, "big")


def generate_keypair() -> tuple[bytes, bytes]:
    """Fresh X25519 key pair as raw (private, public) bytes."""
    sk = X25519PrivateKey.generate()
    raw_sk = sk.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    return raw_sk, sk.public_key().public_bytes(**_RAW)


def public_from_private(raw_sk: bytes) -> bytes:
    """Public key of a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(raw_sk).public_key().public_bytes(**_RAW)


def agree(raw_sk: bytes, peer_pk: bytes) -> bytes:
    """Raw X25519 shared secret; ``ValueError`` on a low-order (all-zero) result."""
    sk = X25519PrivateKey.from_private_bytes(raw_sk)
    return sk.exchange(X25519PublicKey.from_public_bytes(peer_pk))


def hkdf(secret: bytes, *, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 to a 32-byte key."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(secret)


def share_encryption_key(shared: bytes, session_id: bytes, sender: int, receiver: int) -> bytes:
    """AEAD key for shares sent from ``sender`` to ``receiver``.

    The DH secret is symmetric, so the direction goes into ``info``: the two
    directions of a pair never share a key.
    """
    info = _DOMAIN + b"|share-enc|" + id_bytes(sender) + id_bytes(receiver)
    return hkdf(shared, salt=session_id, info=info)


def pairwise_mask_seed(shared: bytes, session_id: bytes, a: int, b: int) -> bytes:
    """Seed of the pairwise mask between ``a`` and ``b`` (same for both orders)."""
    lo, hi = sorted((a, b))
    info = _DOMAIN + b"|pair-mask|" + id_bytes(lo) + id_bytes(hi)
    return hkdf(shared, salt=session_id, info=info)


def self_mask_seed(b: bytes, session_id: bytes, node_id: int) -> bytes:
    """Seed of a client's self mask, derived from its shared secret ``b``."""
    return hkdf(b, salt=session_id, info=_DOMAIN + b"|self-mask|" + id_bytes(node_id))


def share_aad(session_id: bytes, sender: int, receiver: int) -> bytes:
    """Associated data binding a share ciphertext to session, sender and receiver."""
    return _DOMAIN + b"|shares|" + session_id + id_bytes(sender) + id_bytes(receiver)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption; a random nonce is prepended."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes | None:
    """Decrypt ``seal`` output; ``None`` if authentication fails."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        return None
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        return None


def commit(b: bytes, session_id: bytes, node_id: int) -> bytes:
    """Hash commitment to a self-mask secret (``b`` is 256-bit random, so hiding)."""
    return hashlib.sha256(_DOMAIN + b"|commit|" + session_id + id_bytes(node_id) + b).digest()
