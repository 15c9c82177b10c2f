"""Each private Flower API fedlora uses (all in fedlora/flower.py), exercised against the installed Flower.

When a Flower upgrade moves or changes one of them, these tests say which.
"""

import time

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora import flower
from fedlora.arrays import to_record
from fedlora.deploy.certificates import create_tls
from fedlora.processes import free_ports


def _message() -> Message:
    flower.set_task_identity(7, flower.SERVER_NODE_ID, 3)
    content = RecordDict({"arrays": to_record({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}),
                          "config": ConfigRecord({"server-round": 2, "names": ["a", "b"]})})
    return Message(content, dst_node_id=42, message_type="train")


def test_a_message_survives_bytes_with_its_records_and_identity():
    message = _message()
    flower.set_message_id(message, "m-1")
    back = flower.message_from_bytes(flower.message_to_bytes(message))
    assert back.metadata.message_id == "m-1" and back.metadata.run_id == 7
    assert back.metadata.dst_node_id == 42 and back.metadata.message_type == "train"
    np.testing.assert_array_equal(back.content["arrays"]["w"].numpy(), message.content["arrays"]["w"].numpy())
    assert list(back.content["config"]["names"]) == ["a", "b"]
    assert flower.transmit(message).content["config"]["server-round"] == 2


def test_the_task_identity_is_process_wide():
    flower.set_task_identity(1, 5, 11)
    assert flower.current_task_id() == 11
    assert _message().metadata.src_node_id == flower.SERVER_NODE_ID


def test_a_context_survives_bytes_with_its_state():
    context = Context(run_id=3, node_id=9, node_config={"partition-id": 1}, state=RecordDict(),
                      run_config={"model.name": "tiny-bert"})
    context.state["kept"] = ConfigRecord({"x": 1})
    back = flower.context_from_bytes(flower.context_to_bytes(context))
    assert (back.run_id, back.node_id, back.node_config["partition-id"]) == (3, 9, 1)
    assert back.state["kept"]["x"] == 1 and back.run_config["model.name"] == "tiny-bert"


def test_serialized_size_counts_records_including_an_empty_list():
    small = RecordDict({"c": ConfigRecord({"empty": []})})
    big = RecordDict({"a": to_record({"w": np.zeros(1000, dtype=np.float32)})})
    assert 0 < flower.serialized_size(small) < 100 and flower.serialized_size(big) > 4000


def test_an_empty_run_has_the_id():
    assert flower.empty_run(5).run_id == 5


def test_the_fleet_routes_are_posts_under_v1_fleet():
    paths = flower.fleet_post_paths()
    assert "/v1/fleet/pull-messages" in paths and "/v1/fleet/push-messages" in paths
    assert all(p.startswith("/v1/fleet/") for p in paths)


def test_a_signed_fleet_client_reaches_for_its_superlink(tmp_path):
    """The client builds from a site's key and CA, and deactivating a node is a network call
    (here to a closed port, so it fails with a connection error, not a programming error)."""
    tls = create_tls(tmp_path, ["127.0.0.1"])
    key = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    (port,) = free_ports(1)
    client = flower.fleet_client(f"127.0.0.1:{port}", str(tls.ca_cert), key)
    try:
        with pytest.raises(Exception) as caught:
            flower.deactivate_node(client, 12345)
        assert not isinstance(caught.value, (AttributeError, TypeError, ImportError))
    finally:
        client.close()


# -- replies by a deadline: a deployed ServerApp's grid, its Runtime API replaced by a stub --------
class _RuntimeStub:
    """The SuperLink's Runtime API as a deployed ServerApp sees it, holding sites' replies whose data
    (their objects) is uploaded, or is not: the site died between sending the reply and its data."""

    def __init__(self, replies: list[Message], uploaded: bool):
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        self.replies, self.uploaded = replies, uploaded
        self.objects = {oid: obj.deflate() for reply in replies for oid, obj in get_all_nested_objects(reply).items()}
        self.pulls = 0

    def PushMessages(self, request):  # noqa: N802 - Flower's RPC names
        from flwr.proto.runtime_pb2 import PushAppMessagesResponse

        return PushAppMessagesResponse(message_ids=[m.metadata.message_id for m in request.messages_list],
                                       session_id="s", objects_to_push=[])

    def PushObject(self, request):  # noqa: N802 - nothing to push: PushMessages asked for no object
        raise AssertionError("no object was asked for")

    def PullMessages(self, request):  # noqa: N802
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import message_to_proto
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse
        from flwr.supercore.inflatable.inflatable_object import get_object_tree

        wanted = [r for r in self.replies if r.metadata.reply_to_message_id in request.message_ids]
        return PullAppMessagesResponse(messages_list=[message_to_proto(remove_content_from_message(r)) for r in wanted],
                                       message_object_trees=[get_object_tree(r) for r in wanted])

    def PullObject(self, request):  # noqa: N802
        from flwr.proto.message_pb2 import PullObjectResponse

        self.pulls += 1
        content = self.objects.get(request.object_id, b"") if self.uploaded else b""
        return PullObjectResponse(object_found=True, object_available=bool(content), object_content=content)

    def ConfirmMessageReceived(self, request):  # noqa: N802
        return None


def _deployed_grid_with_replies(uploaded: bool, sites: int = 1):
    from flwr.superlink.grid.http_grid import HttpGrid

    grid = HttpGrid(token="t")
    grid.set_run(flower.empty_run(7))
    sent, replies = [], []
    for i in range(sites):
        flower.set_task_identity(7, flower.SERVER_NODE_ID, 1)
        message = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=42 + i,
                          message_type="train")
        message.metadata.__dict__["_message_id"] = message.object_id
        flower.set_task_identity(7, 42 + i, 2)
        reply = Message(RecordDict({"arrays": to_record({"w": np.full((64, 64), i, dtype=np.float32)})}),
                        reply_to=message)
        reply.metadata.__dict__["_message_id"] = reply.object_id
        sent.append(message)
        replies.append(reply)
    grid._client = _RuntimeStub(replies, uploaded)  # noqa: SLF001 - the Runtime API connection
    return grid, sent


def _send_and_receive_in_thread(grid, sent, timeout: float, patience: float = 30.0):
    import threading

    result = {}
    worker = threading.Thread(target=lambda: result.update(r=flower.send_and_receive(grid, sent, timeout=timeout)),
                              daemon=True)
    worker.start()
    worker.join(timeout=patience)  # Flower's own send_and_receive keeps pulling the objects for up to two hours
    assert not worker.is_alive(), f"still waiting for the replies' data {patience:.0f} s past a {timeout} s deadline"
    return result["r"]


def test_a_reply_whose_data_never_arrives_ends_at_the_deadline_as_no_reply():
    import time

    grid, sent = _deployed_grid_with_replies(uploaded=False)
    started = time.monotonic()
    [reply] = _send_and_receive_in_thread(grid, sent, timeout=2.0)
    assert time.monotonic() - started < 10
    assert flower.message_unavailable(reply) and reply.metadata.reply_to_message_id == sent[0].metadata.message_id
    assert grid._client.pulls >= 1  # noqa: SLF001


def test_one_deadline_for_all_replies_however_many_sites_died_mid_upload():
    import time

    grid, sent = _deployed_grid_with_replies(uploaded=False, sites=3)
    started = time.monotonic()
    replies = _send_and_receive_in_thread(grid, sent, timeout=3.0)
    took = time.monotonic() - started
    assert len(replies) == 3 and all(flower.message_unavailable(r) for r in replies)
    assert took < 3.0 + 2.5, f"{took:.1f} s: the deadline was applied per reply, not once"


def test_a_complete_reply_arrives_with_its_data():
    grid, sent = _deployed_grid_with_replies(uploaded=True)
    [reply] = flower.send_and_receive(grid, sent, timeout=5.0)
    assert not reply.has_error() and not flower.message_unavailable(reply)
    np.testing.assert_array_equal(reply.content["arrays"]["w"].numpy(), np.zeros((64, 64), dtype=np.float32))


# -- the Simulation Engine's delivery, indexed by destination ------------------------------------

def _simulation_state(nodes: int):
    """An in-memory LinkState as the Simulation Engine sets one up: `nodes` registered, one run."""
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.supercore.object_store import ObjectStoreFactory

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    node_ids = list(_register_nodes(nodes, factory))
    state = factory.state()
    run = flower.empty_run(7)
    run.federation_id, run.primary_task_id = NOOP_FEDERATION_ID, 1
    state.run_ids[7] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=7)
    flower.set_task_identity(run_id=7, node_id=flower.SERVER_NODE_ID, task_id=1)
    return state, node_ids


def _store(state, node_id: int, ttl: float = 3600.0) -> str:
    message = Message(RecordDict(), dst_node_id=node_id, message_type="train", ttl=ttl)
    flower.set_message_id(message, message.object_id)
    assert state.store_message_ins(message) is not None
    return message.metadata.message_id


def _sweep(state, node_ids) -> dict[int, list[str]]:
    """What the engine's extractor does every 0.1 s: ask each node for its next message."""
    got = {}
    for node in node_ids:
        for message in state.get_message_ins(node_id=node, limit=1):
            got.setdefault(node, []).append(message.metadata.message_id)
    return got


def test_the_engine_delivers_every_message_once_and_scans_only_for_nodes_that_have_one(monkeypatch):
    from flwr.server.superlink.linkstate import InMemoryLinkState
    for name in ("get_message_ins", "store_message_ins"):  # restored after the test
        monkeypatch.setattr(InMemoryLinkState, name, getattr(InMemoryLinkState, name))
    assert flower.deliver_by_destination()
    state, node_ids = _simulation_state(300)
    checks = []
    check = state._check_stored_messages
    monkeypatch.setattr(state, "_check_stored_messages", lambda ids, *a, **k: (checks.append(1), check(ids, *a, **k)))
    sampled = node_ids[::30]  # 10 of 300
    ids = {node: [_store(state, node)] for node in sampled}
    ids[sampled[0]].append(_store(state, sampled[0]))  # two messages for one node: one per sweep (limit 1)
    first = _sweep(state, node_ids)
    assert first == {node: ids[node][:1] for node in sampled}
    assert len(checks) <= 11  # each of a node's own messages, once; Flower's scan: up to 300 nodes × 11
    late = _store(state, node_ids[1])  # stored after the index was built: the next sweep finds it
    assert _sweep(state, node_ids) == {sampled[0]: ids[sampled[0]][1:], node_ids[1]: [late]}
    assert _sweep(state, node_ids) == {}


def test_an_expired_message_is_still_dropped_by_flowers_own_check(monkeypatch):
    from flwr.server.superlink.linkstate import InMemoryLinkState
    for name in ("get_message_ins", "store_message_ins"):
        monkeypatch.setattr(InMemoryLinkState, name, getattr(InMemoryLinkState, name))
    flower.deliver_by_destination()
    state, node_ids = _simulation_state(20)
    gone = _store(state, node_ids[3], ttl=0.2)
    time.sleep(0.3)
    assert _sweep(state, node_ids) == {}
    assert gone not in state.message_ins_store


def test_every_site_asked_at_once_is_served_in_one_sweep_with_one_check_each(monkeypatch):
    from flwr.server.superlink.linkstate import InMemoryLinkState
    for name in ("get_message_ins", "store_message_ins"):
        monkeypatch.setattr(InMemoryLinkState, name, getattr(InMemoryLinkState, name))
    flower.deliver_by_destination()
    state, node_ids = _simulation_state(300)
    checks = []
    check = state._check_stored_messages
    monkeypatch.setattr(state, "_check_stored_messages", lambda ids, *a, **k: (checks.append(1), check(ids, *a, **k)))
    ids = {node: [_store(state, node)] for node in node_ids}  # the last round: every site evaluates
    assert _sweep(state, node_ids) == ids
    assert len(checks) == 300  # Flower's scan: each node walks the stored messages up to its own, 45,150 checks
