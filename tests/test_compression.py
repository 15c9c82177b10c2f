"""Update compression (fedlora/compression.py): the codecs, error feedback, the [compression]
config, the site's residual in its context state, and whole in-process runs per method."""

import math

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from fedlora import compression as z
from fedlora import config as cfg
from fedlora import flower, wire
from fedlora.arrays import from_record, to_record
from fedlora.client import mods
from fedlora.server.rundir import RunDirectory
from fedlora.simulations.inprocess import run_inprocess

NAMES = ("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight",
         "base_model.model.classifier.modules_to_save.default.bias")


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {NAMES[0]: rng.normal(size=(8, 64)).astype(np.float32),
            NAMES[1]: rng.normal(size=(5,)).astype(np.float32)}


def _through_flower(encoded):
    """As the coordinator receives it: one ArrayRecord, serialized and parsed."""
    from flwr.common.serde import array_record_from_proto, array_record_to_proto

    return from_record(array_record_from_proto(array_record_to_proto(to_record(encoded))))


# -- codecs ---------------------------------------------------------------------------------------
def test_none_is_exact_and_fp16_is_within_half_precision():
    u = _update()
    none = z.decode(_through_flower(z.encode(u, "none")), "none")
    assert all(np.array_equal(none[k], u[k]) and none[k].dtype == np.float32 for k in u)
    encoded = z.encode(u, "fp16")
    assert {k.rpartition("#")[2] for k in encoded} == {"f16"} and all(v.dtype == np.float16 for v in encoded.values())
    fp16 = z.decode(_through_flower(encoded), "fp16")
    eps = np.finfo(np.float16).eps  # 2^-10: the relative spacing; round to nearest is within half of it
    for k in u:
        assert fp16[k].dtype == np.float32 and fp16[k].shape == u[k].shape
        assert np.all(np.abs(fp16[k] - u[k]) <= eps / 2 * np.abs(u[k]) + 1e-7)
    assert sum(v.nbytes for v in encoded.values()) * 2 == sum(v.nbytes for v in u.values())


def test_int8_error_is_at_most_half_a_step_and_zero_tensors_survive():
    u = {**_update(1), "zeros": np.zeros((3, 4), np.float32)}
    encoded = z.encode(u, "int8")
    decoded = z.decode(_through_flower(encoded), "int8")
    for k in u:
        scale = float(encoded[f"{k}#scale"][0])
        assert scale == pytest.approx(np.max(np.abs(u[k])) / 127)
        assert encoded[f"{k}#q8"].dtype == np.int8 and np.max(np.abs(encoded[f"{k}#q8"])) <= 127
        assert np.all(np.abs(decoded[k] - u[k]) <= scale / 2 * (1 + 1e-5))
    assert np.array_equal(decoded["zeros"], u["zeros"])


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    u = _update(2)
    u[NAMES[0]][0, :3] = [50.0, -60.0, 55.0]  # large of both signs
    encoded = z.encode(u, "topk", 0.1)
    decoded = z.decode(_through_flower(encoded), "topk")
    for k, x in u.items():
        n = z.topk_count(x.size, 0.1)
        assert n == max(1, math.ceil(0.1 * x.size))
        assert encoded[f"{k}#idx"].dtype == np.int32 and encoded[f"{k}#val"].dtype == np.float32
        assert list(encoded[f"{k}#shape"]) == list(x.shape)
        kept = np.flatnonzero(decoded[k].reshape(-1))
        assert sorted(kept) == sorted(np.argsort(-np.abs(x.reshape(-1)))[:n])  # distinct magnitudes
        assert np.array_equal(decoded[k].reshape(-1)[kept], x.reshape(-1)[kept])
    assert {0, 1, 2} <= set(encoded[f"{NAMES[0]}#idx"].tolist())
    assert z.decode(z.encode(u, "topk", 1.0), "topk")[NAMES[0]].tolist() == u[NAMES[0]].tolist()


def _sums(method: str, feedback: bool, rounds: int):
    u, residual = _update(3), {}
    total = {k: np.zeros_like(v) for k, v in u.items()}
    for _ in range(rounds):
        if feedback:
            encoded, residual = z.encode_with_feedback(u, residual, method, 0.1)
        else:
            encoded = z.encode(u, method, 0.1)
        for k, v in z.decode(encoded, method).items():
            total[k] += v
    error = max(float(np.max(np.abs(total[k] - rounds * u[k]))) for k in u)
    return u, residual, total, error


@pytest.mark.parametrize("method", ["int8", "topk"])
def test_error_feedback_keeps_the_sum_of_uploads_on_the_sum_of_updates(method):
    u, residual, total, fed_back_200 = _sums(method, True, 200)
    _, _, _, fed_back_50 = _sums(method, True, 50)
    _, _, _, plain_50 = _sums(method, False, 50)
    _, _, _, plain_200 = _sums(method, False, 200)
    for k in u:  # what the coordinator got, plus what the site still holds, is everything
        assert np.allclose(total[k] + residual[k], 200 * u[k], atol=1e-3 * 200)
    assert fed_back_200 <= 1.2 * fed_back_50 + 1e-3       # bounded: does not grow with rounds
    assert plain_200 >= 3.5 * plain_50 > 0                # without feedback: grows linearly
    assert fed_back_200 < 0.05 * plain_200
    if method == "int8":  # |r| <= s/2 = max|u + r| / 254 < max|u| / 127
        peak = max(float(np.max(np.abs(v))) for v in u.values())
        assert max(float(np.max(np.abs(r))) for r in residual.values()) <= peak / 127


def test_feedback_ignores_a_residual_of_another_shape():
    u = _update()
    encoded, residual = z.encode_with_feedback(u, {NAMES[0]: np.ones((2, 2), np.float32)}, "int8")
    assert np.array_equal(z.decode(encoded, "int8")[NAMES[0]], z.decode(z.encode(u, "int8"), "int8")[NAMES[0]])
    assert residual.keys() == u.keys()


def _malformed():
    n = NAMES[0]
    int8, topk = z.encode(_update(), "int8"), z.encode(_update(), "topk", 0.1)
    idx = topk[f"{n}#idx"]
    return [
        ("int8", {k: v for k, v in int8.items() if k != f"{n}#scale"}, "missing part"),
        ("int8", {**int8, f"{n}#q9": np.zeros(1, np.int8)}, "unknown suffix"),
        ("int8", {**int8, n: np.zeros(1, np.float32)}, "lacks a '#<part>' suffix"),
        ("int8", {**int8, f"{n}#q8": int8[f"{n}#q8"].astype(np.int16)}, "dtype int16"),
        ("int8", {**int8, f"{n}#scale": np.array([np.nan], np.float32)}, "finite"),
        ("int8", {**int8, f"{n}#scale": np.array([1.0, 2.0], np.float32)}, "one finite number"),
        ("int8", {**int8, f"{n}#q8": np.full((8, 64), -128, np.int8)}, "outside [-127, 127]"),
        ("fp16", int8, "unknown suffix"),
        ("topk", {**topk, f"{n}#idx": idx + 512}, "in [0, 512)"),
        ("topk", {**topk, f"{n}#idx": idx[::-1].copy()}, "strictly increasing"),
        ("topk", {**topk, f"{n}#idx": np.repeat(idx[:1], idx.size)}, "strictly increasing"),
        ("topk", {**topk, f"{n}#val": topk[f"{n}#val"][:-1]}, "equal length"),
        ("topk", {**topk, f"{n}#shape": np.array([-8, 64], np.int64)}, "sizes >= 0"),
        ("topk", {**topk, f"{n}#shape": np.array([2, 2], np.int64)}, "values for a tensor of 4"),
        ("topk", {**topk, f"{n}#shape": np.array([10**6, 10**6], np.int64)}, "more than"),
        ("none", int8, "contains '#'"),
        ("none", {n: np.zeros(3, np.float64)}, "expected float32"),
        ("gzip", int8, "unknown compression method"),
    ]


@pytest.mark.parametrize("method, encoded, message", _malformed())
def test_malformed_encodings_are_rejected_with_a_reason(method, encoded, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        z.decode(encoded, method, max_elements=10_000)


def test_encoding_refuses_names_with_the_separator_and_bad_fractions():
    with pytest.raises(ValueError, match="reserves"):
        z.encode({"a#q8": np.zeros(2, np.float32)}, "int8")
    with pytest.raises(ValueError, match=r"not in \(0, 1\]"):
        z.encode(_update(), "topk", 0.0)


# -- configuration ----------------------------------------------------------------------------------
def test_config_defaults_off_and_refuses_compression_with_secure_aggregation():
    c = cfg.load_config()
    assert (c.compression.method, c.compression.topk_fraction, c.compression.error_feedback) == ("none", 0.1, True)
    assert cfg.from_flat(c.to_flat()) == c
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_config(None, ["compression.method=int8", "secagg.enabled=true", "federation.min-sites=3",
                               "compression.topk-fraction=1.5"])
    text = str(err.value)
    assert "compression.method = 'int8' cannot run under secure aggregation" in text
    assert "compression.topk-fraction: 1.5" in text
    with pytest.raises(cfg.ConfigError, match="is not one of none, fp16, int8, topk"):
        cfg.load_config(None, ["compression.method=zip"])
    assert cfg.load_config(None, ["secagg.enabled=true", "federation.min-sites=3"]).compression.method == "none"


# -- the site: residual in its context state ------------------------------------------------------
def _site(*settings):
    """A site's Context for the compression mod, and what the mod sends of an update."""
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                      run_config=cfg.load_config(None, list(settings)).to_flat())
    flower.set_task_identity(1, 1, 1)
    request = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)

    def send(update):
        handler = lambda msg, ctx: Message(RecordDict({wire.ARRAYS: to_record(update)}), reply_to=msg)  # noqa: E731
        return from_record(mods.compression_mod(request, context, handler).content[wire.ARRAYS])

    return context, send


def test_site_keeps_its_residual_in_context_state_only_when_feedback_applies():
    context, send = _site("compression.method=topk", "compression.topk-fraction=0.25")
    u = _update()
    first = send(u)
    residual = from_record(context.state[mods.RESIDUAL])
    assert np.allclose(residual[NAMES[0]], u[NAMES[0]] - z.decode(first, "topk")[NAMES[0]])
    second = z.decode(send(u), "topk")  # round 2 sends what round 1 left out first
    assert np.allclose(second[NAMES[0]] + from_record(context.state[mods.RESIDUAL])[NAMES[0]],
                       2 * u[NAMES[0]] - z.decode(first, "topk")[NAMES[0]], atol=1e-6)
    for settings in (["compression.method=fp16"], ["compression.method=int8", "compression.error-feedback=false"],
                     []):
        context, send = _site(*settings)
        sent = send(u)
        assert mods.RESIDUAL not in context.state
        assert (sent.keys() == u.keys() and all(np.array_equal(sent[k], u[k]) for k in u)) == (settings == [])


# -- whole runs -------------------------------------------------------------------------------------
COMMON = ["model.name=tiny-bert", "federation.num-sites=2", "federation.rounds=2", "data.records-per-site=24",
          "train.local-steps=2", "train.batch-size=8", "model.max-length=32"]
METHODS = ("none", "fp16", "int8", "topk")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compression-runs")
    out = {}
    for method in METHODS:
        path = run_inprocess(cfg.load_config(None, [*COMMON, f"compression.method={method}"]), root / method)
        out[method] = (RunDirectory(path).read_metrics(), RunDirectory(path).load_checkpoint().global_state)
    return out


@pytest.mark.parametrize("method", METHODS[1:])
def test_a_run_uploads_fewer_bytes_by_exactly_the_encoding_and_still_trains(runs, method):
    rows, state = runs[method]
    base_rows, _ = runs["none"]
    encoded = z.encode(state, method, 0.1)
    data = sum(v.nbytes for v in encoded.values()) / sum(v.nbytes for v in state.values())
    low, high = {"fp16": (0.5, 0.5), "int8": (0.25, 0.26), "topk": (0.2, 0.22)}[method]  # raw data
    assert low <= data <= high
    dense = to_record(state).count_bytes()                        # one site's update on the wire
    packed = to_record(encoded).count_bytes()
    # tiny-bert's tensors have 512 entries, so each part's npy header (128 B) and name weigh in
    assert packed / dense < {"fp16": 0.6, "int8": 0.45, "topk": 0.55}[method]
    for row, base in zip(rows, base_rows):
        assert row["sites"] == 2 and math.isfinite(row["train_loss"]) and math.isfinite(row["eval_loss"])
        saved = base["bytes_up"] - row["bytes_up"]                # the train and evaluate replies of 2 sites
        assert abs(saved - 2 * (dense - packed)) <= 16            # only varint widths of metrics may differ
        assert row["bytes_up"] < (packed / dense + 0.1) * base["bytes_up"]
