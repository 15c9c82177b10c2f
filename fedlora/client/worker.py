"""The site worker: one long-lived process that keeps the base model loaded.

In deployment Flower starts a fresh ClientApp process for every message, so a
site would import torch/transformers and load the base model twice per round
(train and evaluate). `fedlora site start` therefore runs this worker next to
the SuperNode; the ClientApp that `fedlora run` deploys (fedlora.client.relay)
is a thin process that hands each message and its Context to the worker over
a Unix socket readable by the site's user only, and returns the worker's reply.

The worker calls the same ClientApp (fedlora.client.app.app) with the same
Message and Context a cold process would: only the process hosting the code
changes, as with a Ray actor in simulation. Requests are served one at a time.

Protocol: each side sends length-prefixed frames. Request: a JSON header
({"version", "task_id"}), the Message and the Context as Flower protobufs.
Response: a JSON header ({"ok", "error", "load_seconds", "handler_seconds"}),
then (when ok) the reply Message and the updated Context.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("fedlora.client.worker")  # also when run as __main__

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


# -- the worker ---------------------------------------------------------------
def _handle(conn: socket.socket, version: str) -> None:
    from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Context as ContextProto  # pylint: disable=no-name-in-module
    from flwr.proto.message_pb2 import Message as MessageProto  # pylint: disable=no-name-in-module
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.client.app import app as site_app
    from fedlora.client.runtime import site_runtime

    header = json.loads(recv_frame(conn))
    message = message_from_proto(MessageProto.FromString(recv_frame(conn)))
    context = context_from_proto(ContextProto.FromString(recv_frame(conn)))
    if header.get("version") != version:  # the site upgraded fedlora: this worker runs old code
        send_frames(conn, json.dumps({"ok": False, "stale": True,
                                      "error": f"worker runs fedlora {version}, relay {header.get('version')}"}).encode())
        return
    TaskIdentity.run_id, TaskIdentity.node_id = context.run_id, context.node_id
    TaskIdentity.task_id = int(header.get("task_id", 0))
    started = time.perf_counter()
    try:
        site_runtime(context)  # the model load, timed apart (cached after the first message of a run)
    except Exception:  # noqa: BLE001 - the handler below raises it again, with Flower's error reply
        log.debug("site runtime not built before the handler", exc_info=True)
    loaded = time.perf_counter()
    try:
        reply = site_app(message, context)
    except Exception as err:  # noqa: BLE001 - reported to the relay, which raises it in the ClientApp
        log.exception("the ClientApp raised")
        send_frames(conn, json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}).encode())
        return
    done = time.perf_counter()
    send_frames(conn, json.dumps({"ok": True, "load_seconds": loaded - started,
                                  "handler_seconds": done - loaded}).encode(),
                message_to_proto(reply).SerializeToString(), context_to_proto(context).SerializeToString())


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(0)  # the site supervisor is gone: so is the site

    threading.Thread(target=watch, daemon=True).start()


def _bind_private(server: socket.socket, socket_path: Path) -> None:
    """Bind `server` at `socket_path` so that no other user can connect, ever.

    The socket is bound inside a fresh 0700 folder, restricted to 0600, then renamed
    into place. Setting the umask instead would change it for every thread of the
    process, and concurrent callers could leave it restricted for good.
    """
    private = Path(tempfile.mkdtemp(prefix=".bind-", dir=socket_path.parent))
    staged = private / "s"
    try:
        server.bind(str(staged))
        staged.chmod(0o600)
        staged.rename(socket_path)
    finally:
        staged.unlink(missing_ok=True)
        private.rmdir()


def serve(socket_path: Path, parent_pid: int | None = None) -> None:
    """Serve ClientApp requests on a Unix socket until killed."""
    from fedlora import __version__
    import fedlora.client.app  # noqa: F401 - the heavy imports happen once, here, not per message

    socket_path = Path(socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _bind_private(server, socket_path)
    server.listen(4)
    if parent_pid:
        _exit_with_parent(parent_pid)
    log.info("site worker ready on %s", socket_path)
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                _handle(conn, __version__)
            except Exception:  # noqa: BLE001 - a bad request must not stop the site's worker
                log.exception("dropped a ClientApp request")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedlora.client.worker",
                                     description="Keep the site's base model loaded for the fedlora ClientApp.")
    parser.add_argument("--socket", required=True, help="Unix socket path (in the site's state folder)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the site supervisor) exits")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s fedlora-site %(levelname)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("fedlora")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # Flower puts a handler on the root logger: one line per record is enough
    serve(Path(args.socket), args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
