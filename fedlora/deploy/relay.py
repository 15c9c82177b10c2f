"""The ClientApp `fedlora run` deploys: a thin process that relays to the site worker.

Flower starts one ClientApp process per message. This module imports only
Flower (not torch), and hands the message to the site's worker process
(fedlora.deploy.worker), which keeps the base model loaded between messages.
When the site runs no worker (node config without `worker-socket`, or the
worker is down) it runs fedlora.client.app itself, exactly as a cold process.
Either way the same ClientApp handlers answer.

Per message it appends one line to `<state-dir>/timings.jsonl` at the site
(never sent): how long the process took to start, to import fedlora, to load
the model and data, and to train; `fedlora.bench.deployment` reads
these lines.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import psutil
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora import __version__, flower, wire
from fedlora.deploy.frames import WorkerUnavailable, recv_frame, send_frames
from fedlora.privacy.budget import NODE_STATE_DIR  # the site's persistent folder

log = logging.getLogger(__name__)

NODE_WORKER_SOCKET = "worker-socket"  # node config: the site worker's Unix socket
TIMINGS_FILE = "timings.jsonl"


def _process_age() -> float:
    """Seconds since this ClientApp process started (interpreter start, Flower's setup, the FAB)."""
    return time.time() - psutil.Process().create_time()


def _via_worker(path: str, message: Message, context: Context) -> tuple[Message, dict[str, Any]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(10.0)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, socket.timeout) as err:
            raise WorkerUnavailable(f"{path}: {err}") from None
        sock.settimeout(None)  # training may take long; a dead worker closes the socket
        send_frames(sock, json.dumps({"version": __version__, "task_id": flower.current_task_id()}).encode(),
                    flower.message_to_bytes(message), flower.context_to_bytes(context))
        header = json.loads(recv_frame(sock))
        if not header["ok"]:
            if header.get("stale"):
                raise WorkerUnavailable(header["error"])
            raise RuntimeError(f"site worker: {header['error']}")
        reply = flower.message_from_bytes(recv_frame(sock))
        updated = flower.context_from_bytes(recv_frame(sock))
    finally:
        sock.close()
    context.state = updated.state  # Flower stores this context for the node's next message
    return reply, {"mode": "worker", "load_seconds": header["load_seconds"],
                   "handler_seconds": header["handler_seconds"]}


def _in_process(message: Message, context: Context) -> tuple[Message, dict[str, Any]]:
    started = time.perf_counter()
    # Imported here, not at the top: this process relays to the worker, which has torch loaded,
    # and imports torch and transformers (seconds) only when it must answer the message itself.
    from fedlora.client.app import app as site_app
    from fedlora.client.runtime import site_runtime

    imported = time.perf_counter()
    try:
        site_runtime(context)  # timed apart from the handler, which finds it cached
    except Exception:  # noqa: BLE001 - the handler raises it again, with Flower's error reply
        log.debug("site runtime not built before the handler", exc_info=True)
    loaded = time.perf_counter()
    reply = site_app(message, context)
    return reply, {"mode": "in-process", "import_seconds": imported - started, "load_seconds": loaded - imported,
                   "handler_seconds": time.perf_counter() - loaded}


def server_round(message: Message) -> int:
    """The round a message belongs to (-1 when it names none)."""
    try:
        return int(message.content.config_records[wire.CONFIG][wire.SERVER_ROUND])
    except (KeyError, TypeError, ValueError):
        return -1


def _record(context: Context, message: Message, reply: Message, timings: dict[str, Any]) -> None:
    folder = context.node_config.get(NODE_STATE_DIR)
    if not folder:
        return
    row = {"time": time.time(), "run": context.run_id, "round": server_round(message),
           "type": message.metadata.message_type, **timings}
    if not reply.has_error() and wire.METRICS in reply.content.metric_records:
        seconds = reply.content.metric_records[wire.METRICS].get(wire.TRAIN_SECONDS)
        if seconds is not None:
            row["train_seconds"] = float(seconds)
    path = Path(str(folder)).expanduser() / TIMINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


class RelayClientApp(ClientApp):
    """A ClientApp that answers every message type through the site worker (or itself)."""

    def __call__(self, message: Message, context: Context) -> Message:
        process_seconds = _process_age()
        reply = None
        socket_path = context.node_config.get(NODE_WORKER_SOCKET)
        if socket_path:
            try:
                reply, timings = _via_worker(str(socket_path), message, context)
            except WorkerUnavailable as err:
                log.warning("site worker unavailable (%s): running this message in the ClientApp process", err)
        if reply is None:
            reply, timings = _in_process(message, context)
        _record(context, message, reply, {"process_seconds": process_seconds, **timings})
        return reply


app = RelayClientApp()
