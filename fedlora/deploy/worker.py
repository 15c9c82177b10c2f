"""The site worker: one long-lived process that keeps the base model loaded.

In deployment Flower starts a fresh ClientApp process for every message, so a
site would import torch/transformers and load the base model twice per round
(train and evaluate). `fedlora site start` therefore runs this worker next to
the SuperNode; the ClientApp that `fedlora run` deploys (fedlora.deploy.relay)
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

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedlora import __version__, flower, logs
from fedlora.client.app import app as site_app
from fedlora.client.mods import upstream_reason
from fedlora.client.runtime import site_runtime
from fedlora.deploy.frames import recv_frame, send_frames

log = logging.getLogger("fedlora.deploy.worker")  # also when run as __main__

# -- the worker ---------------------------------------------------------------
def _handle(conn: socket.socket, version: str) -> None:
    header = json.loads(recv_frame(conn))
    message = flower.message_from_bytes(recv_frame(conn))
    context = flower.context_from_bytes(recv_frame(conn))
    if header.get("version") != version:  # the site upgraded fedlora: this worker runs old code
        send_frames(conn, json.dumps({"ok": False, "stale": True,
                                      "error": f"worker runs fedlora {version}, relay {header.get('version')}"}).encode())
        return
    flower.set_task_identity(context.run_id, context.node_id, int(header.get("task_id", 0)))
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
        send_frames(conn, json.dumps({"ok": False, "error": upstream_reason(err)}).encode())  # no data, no paths
        return
    done = time.perf_counter()
    send_frames(conn, json.dumps({"ok": True, "load_seconds": loaded - started,
                                  "handler_seconds": done - loaded}).encode(),
                flower.message_to_bytes(reply), flower.context_to_bytes(context))


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
    parser = argparse.ArgumentParser(prog="python -m fedlora.deploy.worker",
                                     description="Keep the site's base model loaded for the fedlora ClientApp.")
    parser.add_argument("--socket", required=True, help="Unix socket path (in the site's state folder)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the site supervisor) exits")
    args = parser.parse_args(argv)
    logs.setup("fedlora-site", propagate=False)
    serve(Path(args.socket), args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
