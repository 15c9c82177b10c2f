"""Protocol payloads as Flower records, and updates as masked vectors (no training involved)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedlora import config as cfg
from fedlora import flower, wire
from fedlora.arrays import payload_bytes
from fedlora.client import secure
from fedlora.client.app import SITE_MODS
from fedlora.privacy.secagg import ProtocolViolation, SecAggClient, SecAggConfig, SecAggServer, messages as m, run_in_memory
from fedlora.privacy.secagg.records import (
    from_config_record,
    payload_of,
    payload_records,
    to_config_record,
)
from fedlora.privacy.secagg.updates import EXTRAS, Layout, decode, encode, weight_scale
from fedlora.simulations.inprocess import InProcessGrid
from fedlora.strategies.base import SiteUpdate, weighted_mean


def _through_flower(payload):
    content = RecordDict(payload_records(payload))
    wire = recorddict_from_proto(recorddict_to_proto(content))  # what the other side parses
    return payload_of(wire), payload_bytes(content)


def test_payloads_survive_flower_serialization_with_64_bit_ids_and_empty_lists():
    payload = {m.STAGE: m.UNMASK, m.SESSION_ID: b"\x01" * 32, m.SURVIVOR_IDS: [2**64 - 1, 7],
               m.DROPPED_IDS: [], m.KEY_SHARES: [], m.SEED_SHARES: [b"\x00" * 66, b"\xff" * 66],
               m.MASKED_VECTOR: np.arange(12, dtype=np.uint8), m.VECTOR_LENGTH: 3}
    received, size = _through_flower(payload)
    assert received.keys() == payload.keys()
    for key, value in payload.items():
        assert np.array_equal(received[key], value) if key == m.MASKED_VECTOR else received[key] == value
    assert size >= 12 + 2 * 66 + 32  # payload_bytes (Flower's count_bytes) works on it


def test_client_state_with_empty_keys_and_seeds_survives_a_config_record():
    client = SecAggClient(2**64 - 1)  # fresh: empty stage, keys and lists
    record = to_config_record(client.state_dict())
    assert record.count_bytes() > 0
    restored = from_config_record(recorddict_from_proto(recorddict_to_proto(RecordDict({"s": record})))["s"])
    assert restored == client.state_dict()


def test_every_stage_is_a_train_message_the_mod_recognises():
    flower.set_task_identity(1, flower.SERVER_NODE_ID, 1)  # who creates the messages
    for stage in m.STAGES:
        request = Message(RecordDict({**payload_records({m.STAGE: stage})}), dst_node_id=1,
                          message_type=MessageType.TRAIN)
        assert secure.stage_of(request) == stage
    plain = Message(RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}), dst_node_id=1,
                    message_type=MessageType.TRAIN)
    assert secure.stage_of(plain) is None
    assert secure.secure_aggregation_mod in SITE_MODS


def test_under_secure_aggregation_a_site_never_answers_a_plain_train_message_with_its_update():
    trained = []

    def train(msg, context):
        trained.append(context.node_id)
        return Message(RecordDict(), reply_to=msg)

    config = cfg.load_config(None, ["secagg.enabled=true", "federation.num-sites=3", "federation.min-sites=3"])
    app = ClientApp(mods=[secure.secure_aggregation_mod])
    app.train()(train)
    grid = InProcessGrid(app, config.to_flat(), 3)
    (reply,) = grid.send_and_receive([Message(RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}),
                                              dst_node_id=next(iter(grid.get_node_ids())),
                                              message_type=MessageType.TRAIN)])
    assert reply.has_error() and reply.error.code == wire.CLEAR_UPLOAD_REFUSED and trained == []


def _updates(n=5, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"a.lora_A": (4, 6), "a.lora_B": (6, 4), "head": (3,)}
    return [SiteUpdate(f"s{i}", float(rng.integers(20, 400)),
                       {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()},
                       {"loss": float(rng.uniform(0.5, 3))}) for i in range(n)]


@pytest.mark.parametrize("bytes_per_param", [4, 3, 2])
def test_secure_weighted_mean_equals_plain_weighted_mean_within_its_bound(bytes_per_param):
    updates, R, M = _updates(), 1.0, 500.0
    layout = Layout.of(updates[0].delta, sorted(updates[0].delta))
    vectors = {1000 + i: encode(u.delta, layout.names, weight_scale(u.weight, M), u.metrics["loss"], R).vector
               for i, u in enumerate(updates)}
    assert all(v.size == layout.size == 4 * 6 * 2 + 3 + EXTRAS for v in vectors.values())
    result = run_in_memory(vectors, config=SecAggConfig(clip_range=R, bytes_per_param=bytes_per_param))
    mean = decode(result.sum, layout, R, M, result.max_error)
    plain = weighted_mean(updates)
    total = sum(u.weight for u in updates)
    assert mean.weight == pytest.approx(total, rel=1e-6 if bytes_per_param > 2 else 1e-2)
    errors = [float(np.abs(mean.delta[k].astype(np.float64) - plain[k]).max()) for k in plain]
    ulp = float(np.spacing(np.float32(0.05)))  # both results are rounded to float32
    assert max(errors) <= mean.error_bound + 2 * ulp
    assert mean.loss == pytest.approx(sum(u.weight * u.metrics["loss"] for u in updates) / total,
                                      abs=200 * mean.error_bound + 1e-6)
    if bytes_per_param == 2:  # coarse enough that the error is visible, and within the bound
        assert max(errors) > 0.01 * mean.error_bound


def test_weights_are_capped_at_the_public_bound_and_must_be_positive():
    assert weight_scale(50, 100) == 0.5 and weight_scale(500, 100) == 1.0
    with pytest.raises(ValueError):
        weight_scale(0, 100)


def test_an_update_with_other_tensors_than_the_layout_is_refused():
    delta = _updates(1)[0].delta
    with pytest.raises(ValueError, match="coordinator expects"):
        encode(delta, ["a.lora_A", "a.lora_B"], 1.0, None, 1.0)


def test_out_of_range_coordinates_are_counted_for_the_site():
    encoded = encode({"x": np.array([0.5, -3.0, 2.0], dtype=np.float32)}, ["x"], 1.0, None, 1.0)
    assert encoded.clipped == 2 and encoded.vector[-2:].tolist() == [0.0, 0.0]  # no loss reported


def test_a_site_checks_the_masked_input_request_before_it_trains():
    """A tampered share is caught before local training spends time or privacy budget."""
    trained = []
    app = ClientApp(mods=[secure.secure_aggregation_mod])
    app.train()(lambda msg, context: trained.append(context.node_id))  # must never run
    config = cfg.load_config(None, ["secagg.enabled=true", "federation.num-sites=3", "federation.min-sites=3"])
    grid = InProcessGrid(app, config.to_flat(), 3)
    server = SecAggServer(sorted(grid.get_node_ids()))

    def stage(name, requests):
        messages = [Message(RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1}), **payload_records(r)}),
                            dst_node_id=node, message_type=MessageType.TRAIN) for node, r in requests.items()]
        return {r.metadata.src_node_id: r for r in grid.send_and_receive(messages)}

    replies = stage(m.SETUP, server.setup_requests())
    replies = stage(m.SHARE_KEYS, server.share_keys_requests({n: payload_of(r.content) for n, r in replies.items()}))
    requests = server.masked_input_requests({n: payload_of(r.content) for n, r in replies.items()})
    victim = min(requests)
    blob = bytearray(requests[victim][m.CIPHERTEXTS][0])
    blob[-1] ^= 1
    requests[victim][m.CIPHERTEXTS][0] = bytes(blob)
    replies = stage(m.MASKED_INPUT, {victim: requests[victim]})
    assert replies[victim].has_error() and "ShareDecryptionError" in replies[victim].error.reason
    assert trained == []


def test_a_replayed_site_state_cannot_answer_unmask_twice(tmp_path):
    """The 'answer unmask once' rule used to live only in the state Flower keeps for the node, which a
    restarted SuperNode (or an older copy of the context) can replay; now the site's own disk has it."""
    ids = [101, 202, 303, 404]
    server = SecAggServer(ids, SecAggConfig(), vector_length=8)
    clients = {i: SecAggClient(i) for i in ids}
    reqs = server.setup_requests()
    reqs = server.share_keys_requests({i: clients[i].advertise_keys(r) for i, r in reqs.items()})
    reqs = server.masked_input_requests({i: clients[i].share_keys(r) for i, r in reqs.items()})
    vectors = {i: np.zeros(8, np.float32) for i in ids}
    unmask = server.unmask_requests({i: clients[i].masked_input(r, vectors[i]) for i, r in reqs.items()})
    site = 101
    config = cfg.load_config(None, ["secagg.enabled=true", "federation.num-sites=4", "federation.min-sites=3"])
    saved = secure.to_config_record(clients[site].state_dict())  # the state before unmask, as Flower kept it
    flower.set_task_identity(1, flower.SERVER_NODE_ID, 1)

    def ask(request):
        context = Context(run_id=1, node_id=site, node_config={"state-dir": str(tmp_path)}, run_config=config.to_flat(),
                          state=RecordDict({secure.STATE: saved}))  # replayed: the same saved state every time
        msg = Message(RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1}), **payload_records(request)}),
                      dst_node_id=site, message_type=MessageType.TRAIN)
        return secure.secure_aggregation_mod(msg, context, lambda *_: pytest.fail("unmask never trains"))

    assert not ask(unmask[site]).has_error()
    other_list = dict(unmask[site], **{m.SURVIVOR_IDS: [101, 202, 303], m.DROPPED_IDS: [404]})
    with pytest.raises(ProtocolViolation, match="already answered"):
        ask(other_list)
    # Control: without the durable record, the replayed state answers again, with the other kind of share.
    (tmp_path / secure.UNMASK_RECORD).unlink()
    reply = payload_of(ask(other_list).content)
    assert reply[m.KEY_SHARE_IDS] == [404]
