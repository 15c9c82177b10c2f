"""Every use of Flower's private modules, in one place.

fedlora builds on Flower's public Message API (`flwr.app`, `flwr.clientapp`,
`flwr.serverapp`). A few jobs need more than that: serializing a Message and a
Context to bytes (the site worker's socket, the in-process grid), the process-
wide task identity a Message is stamped with, the Fleet API's route list (the
Fleet-only proxy), the signed `deactivate-node` call a site makes to end a
crashed session, and a deadline on downloading a reply's data (a deployed
ServerApp would otherwise wait up to two hours for a site that died while
uploading its update); and, for the deployment tests, hooks on the points a
SuperNode passes with a train message, where a test makes a site crash; and the Simulation Engine's
delivery of messages, indexed by destination so that a round costs the sites sampled, not the sites
connected. Those reach into Flower's private modules, which change
between releases; they are imported here and nowhere else, so a Flower upgrade
breaks in this one file, with the message below, and tests/test_flower.py
exercises each of them.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable

import flwr
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import Context, Message, MessageType, RecordDict


def _moved(err: ImportError) -> str:
    return (f"fedlora needs flwr 1.42 (installed: {flwr.__version__}); a private Flower module it uses "
            f"changed: {err}. Install the flwr version fedlora's pyproject.toml pins.")


try:
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        message_from_proto,
        message_to_proto,
        recorddict_to_proto,
    )
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=no-name-in-module
    from flwr.proto.message_pb2 import Context as ContextProto  # pylint: disable=no-name-in-module
    from flwr.proto.message_pb2 import Message as MessageProto  # pylint: disable=no-name-in-module
    from flwr.supercore.date import now
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
except ImportError as err:  # pragma: no cover - only with a Flower other than the one fedlora targets
    raise ImportError(_moved(err)) from err

# How every Flower process fedlora starts is run: no telemetry or update check (hospitals want no
# egress, and there is no network here), nothing fetched from a hub, Ray's usage stats off.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
              "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}

SERVER_NODE_ID = SUPERLINK_NODE_ID
CLIENT_APP_RAISED = ErrorCode.CLIENT_APP_RAISED_EXCEPTION


# -- Message and Context as bytes ---------------------------------------------------------
def message_to_bytes(message: Message) -> bytes:
    return message_to_proto(message).SerializeToString()


def message_from_bytes(data: bytes) -> Message:
    return message_from_proto(MessageProto.FromString(data))


def context_to_bytes(context: Context) -> bytes:
    return context_to_proto(context).SerializeToString()


def context_from_bytes(data: bytes) -> Context:
    return context_from_proto(ContextProto.FromString(data))


def transmit(message: Message) -> Message:
    """The message as the other side receives it: serialized and parsed again."""
    return message_from_proto(message_to_proto(message))


def serialized_size(content: RecordDict) -> int:
    """Serialized bytes of a message's records (robust where `count_bytes` is not: an empty
    list in a ConfigRecord)."""
    return recorddict_to_proto(content).ByteSize()


# -- the task identity a Message is stamped with -------------------------------------------
def set_task_identity(run_id: int, node_id: int, task_id: int) -> None:
    """Who this process is, for the Messages it creates (Flower keeps it process-wide)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id


def current_task_id() -> int:
    """The task id of this process (0 when Flower has not set one)."""
    try:
        return int(TaskIdentity.task_id)
    except RuntimeError:
        return 0


def set_message_id(message: Message, message_id: str) -> None:
    """Give a Message the id a SuperLink would (the public Metadata has no setter for it)."""
    message.metadata.__dict__["_message_id"] = message_id


def empty_run(run_id: int) -> Run:
    return Run.create_empty(run_id)


# -- replies by a deadline -----------------------------------------------------------------
POLL_SECONDS = 3.0  # how often Flower's own send_and_receive polls for replies
DEADLINE_POLL_SECONDS = 1.0  # the longest wait between two tries of a reply's data


def send_and_receive(grid, messages: list[Message], timeout: float) -> list[Message]:
    """`grid.send_and_receive(messages, timeout=timeout)`, except that the deadline also bounds
    the download of each reply's data.

    A deployed ServerApp (Flower's HttpGrid) pulls a reply in two steps: the message, then its
    objects (the update's tensors), retrying the objects for up to two hours. A site that dies
    after sending its reply but before uploading the objects would hold the round that long.
    Here the object downloads end at the deadline: such a reply comes back as an error reply
    (MESSAGE_UNAVAILABLE), which the caller counts as no reply.
    """
    try:  # imported here: 0.7 s that only a deployed ServerApp needs
        import flwr.superlink.grid.http_grid as http_grid
    except ImportError as err:  # pragma: no cover
        raise ImportError(_moved(err)) from err
    if not isinstance(grid, http_grid.HttpGrid):  # in memory: a reply arrives whole
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = {mid for mid in grid.push_messages(messages) if mid}
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        with _object_downloads_until(http_grid, deadline):
            received = list(grid.pull_messages(pending))
        replies.extend(received)
        pending.difference_update(m.metadata.reply_to_message_id for m in received)
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(POLL_SECONDS, left))
    return replies


@contextmanager
def _object_downloads_until(http_grid, deadline: float):
    """HttpGrid.pull_messages downloads each reply's objects with `pull_objects(..., max_time=7200)`,
    one reply after another, each call with a clock of its own: every call gets the time left to the
    one deadline. (The first try of each object still happens after it: data already there is taken.)
    pull_objects checks its time only between tries, which back off up to 10 s apart, so a download
    could end that long past the deadline: tries here are at most DEADLINE_POLL_SECONDS apart."""
    unbounded = http_grid.pull_objects

    def until_deadline(*args, **kwargs):
        return unbounded(*args, **{**kwargs, "max_time": max(0.0, deadline - time.monotonic()),
                                   "backoff_cap": DEADLINE_POLL_SECONDS})

    http_grid.pull_objects = until_deadline
    try:
        yield
    finally:
        http_grid.pull_objects = unbounded


def message_unavailable(message: Message) -> bool:
    """An error reply standing for a reply whose data never fully arrived."""
    return message.has_error() and message.error.code == ErrorCode.MESSAGE_UNAVAILABLE


# -- the Fleet API -------------------------------------------------------------------------
# The Fleet router and the HTTP interceptors are imported when needed (at the coordinator's proxy and a
# site's start): together they take 0.6 s to import, and the relay ClientApp, which Flower starts
# afresh for every message, never needs them.
def fleet_post_paths() -> frozenset[str]:
    """The Fleet API's POST routes in the installed Flower, e.g. /v1/fleet/pull-messages."""
    try:
        from flwr.superlink.routers.fleet.router import router as fleet_router
    except ImportError as err:  # pragma: no cover
        raise ImportError(_moved(err)) from err
    return frozenset(r.path for r in fleet_router.routes if "POST" in getattr(r, "methods", ()))


def fleet_client(superlink: str, root_certificates: str, private_key_pem: bytes):
    """A Fleet API client that signs its requests with a site's key, as a SuperNode does."""
    try:
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
        from flwr.supernode.fleet_http_client import FleetHttpClient
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
    except ImportError as err:  # pragma: no cover
        raise ImportError(_moved(err)) from err
    key = load_ssh_private_key(private_key_pem, None)
    return FleetHttpClient.from_server_address(
        superlink, insecure=False, root_certificates=root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                      NodeAuthHttpInterceptor(key, key.public_key())])


def deactivate_node(client, node_id: int) -> None:
    """End a node's session at the SuperLink (what a SuperNode sends when it stops cleanly)."""
    client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))


# -- whose data the sites read ---------------------------------------------------------------
INMEMORY_GRID_MODULE = "flwr.superlink.grid.inmemory_grid"  # the Simulation Engine's Grid (InMemoryGrid)


def simulated_sites(grid) -> bool:
    """Whether the ServerApp's sites are simulated ones (Flower `partition-id`, no `data-path` of
    their own), which read the run's data: data.path, or the synthetic corpus when it is empty.
    True on the Simulation Engine's grid and on a grid that says so (`simulated_sites`, as
    fedlora's in-process grid does); False on a deployment's grid, whose SuperNodes read their
    own files. Not imported to ask: it is loaded already when it is the grid (0.4 s otherwise)."""
    said = getattr(grid, "simulated_sites", None)
    if said is not None:
        return bool(said)
    module = sys.modules.get(INMEMORY_GRID_MODULE)
    return module is not None and isinstance(grid, module.InMemoryGrid)


# -- the Simulation Engine's delivery of messages to simulated sites ------------------------------
INMEMORY_LINKSTATE_MODULE = "flwr.server.superlink.linkstate.in_memory_linkstate"


def deliver_by_destination() -> bool:
    """Make the Simulation Engine's message delivery cost what the messages cost, not the sites.

    Flower 1.42's engine (`vce_api.add_messages_to_queue`) asks its in-memory LinkState every 0.1 s
    for each connected node's next message, and `InMemoryLinkState.get_message_ins` scans the stored
    messages, checking each, until it finds that node's: a sweep costs sites × messages (0.67 s of
    CPU at 1,000 sites and 100 messages, 6 s at 10,000; minutes when every site is asked at once),
    so a message waits up to a sweep to be noticed and the sweeping takes a core from the sites.

    This keeps, per LinkState, each node's undelivered messages in the order they were stored,
    rebuilt whenever a message is stored (the one way one arrives), and answers a node from its
    own list with Flower's own steps: each candidate checked (`_check_stored_messages`, which drops
    an expired or orphaned message), matched on node, run and not yet delivered, up to `limit`, and
    marked delivered. Deliveries and deletions only shrink the lists, so a list older than them
    still holds every message the scan would find. Returns False where no in-memory LinkState is
    loaded (a deployment's SuperLink keeps its state in SQLite, in another process)."""
    module = sys.modules.get(INMEMORY_LINKSTATE_MODULE)
    if module is None:
        return False
    state_class = module.InMemoryLinkState
    if getattr(state_class.get_message_ins, "indexed_by_fedlora", False):
        return True
    get_message_ins, store_message_ins = state_class.get_message_ins, state_class.store_message_ins

    def stored(self, message: Message):
        message_id = store_message_ins(self, message)
        with self.lock:
            self.fedlora_stored = getattr(self, "fedlora_stored", 0) + 1
        return message_id

    def waiting(self) -> dict[int, list[str]]:
        version = getattr(self, "fedlora_stored", 0)
        index = getattr(self, "fedlora_waiting", None)
        if index is None or index[0] != version:
            lists: dict[int, list[str]] = {}
            for message_id, message in self.message_ins_store.items():
                if message.metadata.delivered_at == "":
                    lists.setdefault(message.metadata.dst_node_id, []).append(message_id)
            index = self.fedlora_waiting = (version, lists)
        return index[1]

    def indexed(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Message]:
        if limit is not None and limit < 1:
            return get_message_ins(self, node_id, limit, run_id=run_id)  # Flower's own refusal
        with self.lock:
            lists = waiting(self)
            found: list[Message] = []
            for message_id in lists.get(node_id, ()):
                self._check_stored_messages({message_id})
                message = self.message_ins_store.get(message_id)
                if (message and message.metadata.dst_node_id == node_id
                        and (run_id is None or message.metadata.run_id == run_id)
                        and message.metadata.delivered_at == ""):
                    found.append(message)
                if limit and len(found) == limit:
                    break
            delivered_at = now().isoformat()
            for message in found:
                message.metadata.delivered_at = delivered_at
            if node_id in lists:
                store = self.message_ins_store
                left = [i for i in lists[node_id] if (m := store.get(i)) and m.metadata.delivered_at == ""]
                if left:
                    lists[node_id] = left
                else:
                    del lists[node_id]
        return found

    indexed.indexed_by_fedlora = True
    state_class.store_message_ins, state_class.get_message_ins = stored, indexed
    return True


# -- a SuperNode's progress through a train message (the deployment tests' crash points) -------
SUPERNODE_POINTS = ("received", "trained", "replied")


def watch_supernode(on_point: Callable[[str, int], None]) -> None:
    """In a `flower-supernode` process: call `on_point(point, n)` as its n-th train message reaches
    each point: "received" (pulled from the SuperLink, before the ClientApp runs), "trained" (the
    ClientApp handed its reply back, before the SuperNode sends it), "replied" (the reply message is
    at the SuperLink; its data, the update, is not uploaded yet)."""
    try:
        import flwr.supernode.servicer.runtime.runtime_handlers as runtime_handlers
        import flwr.supernode.start_client_internal as supernode
    except ImportError as err:  # pragma: no cover
        raise ImportError(_moved(err)) from err
    counts: dict[str, int] = {}

    def passed(point: str, message_type: str) -> None:
        if message_type == MessageType.TRAIN:
            counts[point] = counts.get(point, 0) + 1
            on_point(point, counts[point])

    pull_and_store, push_replies, hand_back = (supernode._pull_and_store_message, supernode._push_messages,
                                               runtime_handlers.push_messages)

    def watched_pull_and_store(*args, receive, **kwargs):
        def receive_and_watch():
            got = receive()
            if got is not None:
                passed("received", got[0].metadata.message_type)
            return got
        return pull_and_store(*args, receive=receive_and_watch, **kwargs)

    def watched_push_replies(*args, send, **kwargs):
        def send_and_watch(message, *rest):
            sent = send(message, *rest)
            passed("replied", message.metadata.message_type)  # the objects are pushed after this returns
            return sent
        return push_replies(*args, send=send_and_watch, **kwargs)

    def watched_hand_back(request, *args, **kwargs):
        for proto in request.messages_list:
            passed("trained", proto.metadata.message_type)
        return hand_back(request, *args, **kwargs)

    supernode._pull_and_store_message = watched_pull_and_store
    supernode._push_messages = watched_push_replies
    runtime_handlers.push_messages = watched_hand_back
