"""End-to-end rounds: correct sums, dropout recovery, aborts, Flower-record transport."""

import numpy as np
import pytest

from fedlora.privacy.secagg import (
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    messages as m,
    run_in_memory,
)


def _vectors(n, length=2000, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    ids = set(int(i) for i in rng.integers(0, 2**64, size=n, dtype=np.uint64))  # Flower: uint64 node ids
    assert len(ids) == n
    return {int(i): rng.uniform(-scale, scale, length).astype(np.float32) for i in ids}


def _plain_sum(vectors, ids, clip=1.0):
    return sum(np.clip(vectors[i].astype(np.float64), -clip, clip) for i in ids)


@pytest.mark.parametrize("n", [3, 4, 7, 12, 20])
def test_secure_sum_equals_plain_sum_within_quantization_error(n):
    vectors = _vectors(n, seed=n)
    result = run_in_memory(vectors)
    assert result.included == tuple(sorted(vectors)) and result.dropped == ()
    error = np.abs(result.sum - _plain_sum(vectors, vectors)).max()
    assert error <= result.max_error
    assert np.allclose(result.mean(), result.sum / n)


@pytest.mark.parametrize("bytes_per_param", [1, 2, 3])
def test_narrow_uploads_and_clipping(bytes_per_param):
    vectors = _vectors(6, scale=2.0, seed=bytes_per_param)  # half the values get clipped
    config = SecAggConfig(clip_range=1.0, bytes_per_param=bytes_per_param)
    result = run_in_memory(vectors, config=config)
    assert np.abs(result.sum - _plain_sum(vectors, vectors)).max() <= result.max_error


def test_sparse_secagg_plus_graph():
    vectors = _vectors(40, length=500, seed=1)
    config = SecAggConfig(degree=6, threshold=4)
    dropped = list(vectors)[:2]
    result = run_in_memory(vectors, config=config, dropouts_after_keys=dropped, dropouts_after_masking=list(vectors)[2:3])
    assert set(result.dropped) == set(dropped)
    assert np.abs(result.sum - _plain_sum(vectors, result.included)).max() <= result.max_error


# Thresholds at most half a neighbourhood, accepted here on purpose: the recovery arithmetic is the
# same at any threshold, and a low one lets few survivors exercise it (fedlora refuses them by default).
WEAK = SecAggConfig(allow_weak_threshold=True)


@pytest.mark.parametrize("dropouts", [1, 2, 3, 4, 5])
def test_dropouts_after_key_sharing_are_recovered(dropouts):
    # n = 8, t = 3: every secret stays recoverable while 3 clients survive.
    vectors = _vectors(8, seed=dropouts)
    gone = list(vectors)[:dropouts]
    result = run_in_memory(vectors, threshold=3, config=WEAK, dropouts_after_keys=gone)
    assert set(result.dropped) == set(gone)
    assert len(result.included) == 8 - dropouts
    assert np.abs(result.sum - _plain_sum(vectors, result.included)).max() <= result.max_error


def test_dropouts_at_every_stage_together():
    vectors = _vectors(10, seed=3)
    ids = list(vectors)
    result = run_in_memory(
        vectors, threshold=4, config=WEAK,
        dropouts_after_advertise=ids[:1], dropouts_after_keys=ids[1:3], dropouts_after_masking=ids[3:5],
    )
    # Clients that uploaded but then vanished still count: their masks are rebuilt.
    assert set(result.included) == set(ids[3:])
    assert np.abs(result.sum - _plain_sum(vectors, result.included)).max() <= result.max_error


def test_too_many_dropouts_after_keys_abort():
    vectors = _vectors(8, seed=4)
    with pytest.raises(SecAggAbort) as err:
        run_in_memory(vectors, threshold=3, config=WEAK, dropouts_after_keys=list(vectors)[:6])
    assert (err.value.available, err.value.needed) == (2, 3)


def test_too_few_shares_names_client_and_counts():
    vectors = _vectors(8, seed=5)
    ids = sorted(vectors)
    # Everyone uploads; only two help unmask, threshold 3: no self-mask seed can be rebuilt.
    with pytest.raises(SecAggAbort) as err:
        run_in_memory(vectors, threshold=3, config=WEAK, dropouts_after_masking=ids[2:])
    assert err.value.client_id == ids[0]
    assert (err.value.available, err.value.needed) == (2, 3)
    assert f"client {ids[0]}" in str(err.value) and "2 shares available, 3 needed" in str(err.value)


def test_sparse_neighbourhood_losing_too_many_aborts_with_that_client():
    vectors = _vectors(12, seed=6)
    config = SecAggConfig(degree=4, threshold=4)
    from fedlora.privacy.secagg.graph import neighbour_graph

    seed = b"g" * 32
    target = sorted(vectors)[0]
    neighbours = neighbour_graph(list(vectors), 4, seed)[target]
    with pytest.raises(SecAggAbort) as err:
        run_in_memory(vectors, config=config, graph_seed=seed, dropouts_after_keys=neighbours[:2])
    assert err.value.client_id is not None and err.value.available < err.value.needed == 4


def test_payloads_and_client_state_survive_flower_records():
    flwr_app = pytest.importorskip("flwr.app")
    serde = pytest.importorskip("flwr.common.serde")

    def through_flower(payload):
        config, arrays = m.split_payload(payload)
        config_rec = serde.config_record_from_proto(serde.config_record_to_proto(flwr_app.ConfigRecord(config)))
        out = dict(config_rec)
        if arrays:
            rec = flwr_app.ArrayRecord({k: flwr_app.Array(v) for k, v in arrays.items()})
            rec = serde.array_record_from_proto(serde.array_record_to_proto(rec))
            out.update({k: rec[k].numpy() for k in arrays})
        return out

    vectors = _vectors(4, length=300, seed=7)
    result = run_in_memory(
        vectors, dropouts_after_keys=list(vectors)[:1],
        tamper=lambda stage, node, direction, payload: through_flower(payload),
    )
    assert np.abs(result.sum - _plain_sum(vectors, result.included)).max() <= result.max_error
    state = SecAggClient(next(iter(vectors))).state_dict()
    assert SecAggClient.from_state_dict(through_flower(state)).state_dict() == state
