"""Exceptions raised by the secure-aggregation protocol.

Runtime failures subclass ``SecAggError`` (a ``RuntimeError``); bad parameters
raise ``SecAggConfigError`` (a ``ValueError``) naming the field and value.
"""

from __future__ import annotations

from typing import Sequence


class SecAggError(RuntimeError):
    """Base class of every protocol failure."""


class SecAggConfigError(ValueError):
    """A protocol parameter is invalid."""


class SecAggAbort(SecAggError):
    """Too few clients or shares are left to finish the round safely.

    ``client_id`` is the client whose secret cannot be rebuilt (``None`` when the
    shortfall is global), ``available``/``needed`` the share or client counts.
    """

    def __init__(
        self,
        message: str,
        *,
        client_id: int | None = None,
        available: int | None = None,
        needed: int | None = None,
    ) -> None:
        super().__init__(message)
        self.client_id = client_id
        self.available = available
        self.needed = needed


class ShareDecryptionError(SecAggError):
    """A share ciphertext failed AEAD authentication (tampered or misrouted)."""

    def __init__(self, sender: int, receiver: int) -> None:
        super().__init__(
            f"share ciphertext from client {sender} to client {receiver} failed "
            "authentication: it was altered, misrouted or belongs to another session"
        )
        self.sender = sender
        self.receiver = receiver


class ShareVerificationError(SecAggError):
    """Reconstructed secret does not match the client's commitment, or shares disagree."""

    def __init__(self, message: str, *, client_id: int, holders: Sequence[int]) -> None:
        super().__init__(message)
        self.client_id = client_id
        self.holders = tuple(holders)


class ProtocolViolation(SecAggError):
    """A message is out of order, malformed, or asks for something unsafe."""
