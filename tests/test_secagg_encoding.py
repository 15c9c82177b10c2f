"""Fixed-point encoding, packing, mask expansion and the neighbour graph."""

import numpy as np
import pytest

from fedlora.privacy.secagg import SecAggConfig, SecAggConfigError, neighbour_graph
from fedlora.privacy.secagg.encoding import (
    Quantizer,
    bytes_per_param,
    choose_modulus_bits,
    pack,
    unpack,
    word_dtype,
)
from fedlora.privacy.secagg.prg import expand


def test_modulus_choice_and_width():
    assert choose_modulus_bits(16, 1) == 16
    assert choose_modulus_bits(16, 3) == 18
    assert choose_modulus_bits(16, 4) == 18
    assert choose_modulus_bits(16, 5) == 19
    assert choose_modulus_bits(27, 20) == 32
    assert [bytes_per_param(m) for m in (8, 9, 16, 17, 24, 25, 32)] == [1, 2, 2, 3, 3, 4, 4]
    q = Quantizer.for_clients(20)  # default: most precise that fits 4 bytes
    assert (q.bits, q.modulus_bits, q.bytes_per_param) == (27, 32, 4)
    assert Quantizer.for_clients(10, bytes_per_param=2).bits == 12
    with pytest.raises(SecAggConfigError):
        Quantizer.for_clients(20, bits=30)  # would need a 35-bit modulus


@pytest.mark.parametrize("bits,n", [(8, 3), (12, 10), (16, 20), (27, 20)])
def test_quantize_decode_round_trip_within_half_step(bits, n):
    q = Quantizer.for_clients(n, clip_range=2.0, bits=bits)
    x = np.random.default_rng(bits).uniform(-2, 2, 5000).astype(np.float32)
    decoded = q.decode_sum(q.quantize(x))
    assert np.abs(decoded - x).max() <= q.step / 2 + 1e-12
    assert q.quantize(x).dtype == word_dtype(q.modulus_bits)


@pytest.mark.parametrize("bits,n", [(8, 3), (12, 16), (16, 17), (27, 20)])
def test_sum_of_n_extremes_does_not_wrap(bits, n):
    q = Quantizer.for_clients(n, bits=bits)
    for value in (q.clip_range, -q.clip_range):
        words = [q.quantize(np.full(4, value)) for _ in range(n)]
        total = np.zeros(4, dtype=q.dtype)
        for w in words:
            total += w
        total &= q.dtype.type(q.modulus_mask)
        assert np.allclose(q.decode_sum(total), n * value)


def test_clipping_and_non_finite_inputs():
    q = Quantizer.for_clients(3, clip_range=1.0, bits=16)
    decoded = q.decode_sum(q.quantize(np.array([5.0, -7.0, 0.25])))
    assert np.allclose(decoded, [1.0, -1.0, 0.25], atol=q.step)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError):
            q.quantize(np.array([0.0, bad]))


@pytest.mark.parametrize("m", [8, 12, 16, 20, 24, 32])
def test_pack_round_trip_at_chosen_width(m):
    values = np.random.default_rng(m).integers(0, 2**m, 1001, dtype=np.uint64).astype(word_dtype(m))
    packed = pack(values, m)
    assert packed.dtype == np.uint8 and packed.size == values.size * bytes_per_param(m)
    assert np.array_equal(unpack(packed, m), values)
    assert np.array_equal(unpack(packed.tobytes(), m), values)


def test_mask_expansion_is_deterministic_and_seed_dependent():
    seed_a, seed_b = bytes(range(32)), bytes(range(1, 33))
    a = expand(seed_a, 1000, np.uint32)
    assert np.array_equal(a, expand(seed_a, 1000, np.uint32))
    assert np.mean(a == expand(seed_b, 1000, np.uint32)) < 0.01
    # The 16-bit view is the same keystream, read two bytes at a time.
    assert np.array_equal(expand(seed_a, 2000, np.uint16).view("<u4"), a)
    with pytest.raises(ValueError):
        expand(b"short", 10)


def test_graph_is_pure_symmetric_and_has_the_requested_degree():
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 2**63, 40)]
    g = neighbour_graph(ids, 6, b"seed")
    assert g == neighbour_graph(list(reversed(ids)), 6, b"seed")  # order-independent
    assert g != neighbour_graph(ids, 6, b"other seed")
    assert all(len(js) == 6 and i not in js for i, js in g.items())
    assert all(i in g[j] for i, js in g.items() for j in js)
    complete = neighbour_graph(ids[:5], 6, b"seed")
    assert all(len(js) == 4 for js in complete.values())


def test_config_reports_every_problem_together():
    with pytest.raises(SecAggConfigError) as err:
        SecAggConfig(threshold=1, degree=1, clip_range=-1.0, bytes_per_param=5)
    for field in ("threshold", "degree", "clip_range", "bytes_per_param"):
        assert field in str(err.value)
    with pytest.raises(SecAggConfigError):
        SecAggConfig().resolve(2)  # two clients would learn each other's update
    with pytest.raises(SecAggConfigError):
        SecAggConfig(threshold=5, degree=2).resolve(10)  # t > k + 1
