"""Length-prefixed frames over a Unix socket: how the relay ClientApp and the site worker talk.

Light on purpose (standard library only): the relay imports it in every
ClientApp process Flower starts.
"""

from __future__ import annotations

import socket
import struct

_LENGTH = struct.Struct("!Q")


class WorkerUnavailable(RuntimeError):
    """No worker answers on the socket; the caller may run the message itself."""


# -- framing ------------------------------------------------------------------
def send_frames(sock: socket.socket, *frames: bytes) -> None:
    for frame in frames:
        sock.sendall(_LENGTH.pack(len(frame)) + frame)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    return _recv_exact(sock, size)
