"""Exactness (ΔW of the aggregate vs Σ wᵢ ΔWᵢ), heterogeneous ranks, base corrections and
state round trips, on random LoRA-shaped states."""

import numpy as np
import pytest

from fedlora.server.rundir import Checkpoint, RunDirectory
from fedlora.strategies import STRATEGIES
from fedlora.strategies.base import SiteUpdate, local_adapter, weighted_mean
from fedlora.strategies.correction import BaseCorrection
from fedlora.strategies.factors import delta_w, lora_layers, pad, truncate
from strategy_cases import random_state, random_updates, strategy

SCALE = 2.0  # alpha 8 / rank 4


def _mean_delta_w(global_state, updates, layer):
    """Σ wᵢ ΔWᵢ from each site's full local adapter, computed independently of the strategies: the
    global adapter with the site's update added to the first rᵢ components, the rest the global's."""
    a, b = lora_layers(global_state)[layer]
    total, weight = 0.0, sum(u.weight for u in updates)
    for u in updates:
        local_a, local_b = global_state[a].copy(), global_state[b].copy()
        local_a[:u.rank] += u.delta.get(a, 0.0)
        local_b[:, :u.rank] += u.delta.get(b, 0.0)
        total = total + u.weight * delta_w(local_a, local_b, SCALE)
    return total / weight


def _global_delta_w(s, new_state, layer, before: BaseCorrection | None = None):
    a, b = lora_layers(new_state)[layer]
    got = delta_w(new_state[a], new_state[b], SCALE)
    correction = s.base_correction()
    if correction:
        got = got + correction.dense(layer) - (before.dense(layer) if before else 0.0)
    return got


@pytest.mark.parametrize("name, ranks", [
    ("ffa", [4, 4, 4]), ("ffa", [4, 2, 1]),
    ("fedex", [4, 4, 4]), ("fedex", [4, 2, 1]),
    ("flora", [4, 4, 4]), ("flora", [4, 3, 1]),
])
def test_exact_strategies_match_the_weighted_mean_update(name, ranks):
    rng = np.random.default_rng(0)
    s = strategy(name, rank=4, alpha=8.0)
    g = random_state(rng)
    for _ in range(2):  # a second round starts from the first one's result and correction
        before = BaseCorrection.from_arrays(s.base_correction().to_arrays()) if s.base_correction() else None
        updates = random_updates(rng, g, ranks, [1.0, 2.0, 3.0], send_a=not s.freeze_a)
        new = s.aggregate(g, updates)
        for layer in lora_layers(g):
            target = _mean_delta_w(g, updates, layer)
            got = _global_delta_w(s, new, layer, before)
            assert np.linalg.norm(got - target) <= 1e-5 * np.linalg.norm(target)
        assert s.round_metrics()["aggregation_error"] <= 1e-5
        g = new


def test_fedit_is_measurably_inexact():
    rng = np.random.default_rng(1)
    s = strategy("fedit", rank=4, alpha=8.0)
    g = random_state(rng)
    updates = random_updates(rng, g, [4, 4, 4], [1.0, 1.0, 2.0], scale=0.5)
    new = s.aggregate(g, updates)
    error = s.round_metrics()["aggregation_error"]
    # the same figure, computed independently
    num = sum(np.sum((_global_delta_w(s, new, l) - _mean_delta_w(g, updates, l)) ** 2) for l in lora_layers(g))
    den = sum(np.sum(_mean_delta_w(g, updates, l) ** 2) for l in lora_layers(g))
    assert error == pytest.approx(np.sqrt(num / den), rel=1e-6)
    assert error > 1e-3


def test_smaller_rank_sites_keep_the_global_components_they_never_held():
    rng = np.random.default_rng(2)
    g = random_state(rng)
    update = random_updates(rng, g, [2], [1.0])[0]
    local = local_adapter(g, update.delta)
    a, b = lora_layers(g)["m.l0"]
    assert np.array_equal(local[a][2:], g[a][2:]) and np.array_equal(local[b][:, 2:], g[b][:, 2:])
    assert np.allclose(local[a][:2], g[a][:2] + update.delta[a])
    new = strategy("fedit", rank=4, alpha=8.0).aggregate(g, [update])
    assert np.allclose(new[a], local[a]) and np.allclose(new[b], local[b])


def test_a_site_of_unsupported_rank_is_rejected_with_the_reason():
    rng = np.random.default_rng(3)
    g = random_state(rng)
    update = random_updates(rng, g, [2], [1.0])[0]
    assert strategy("flora", rank=4, alpha=8.0).check_upload(update, g) is None
    problem = strategy("median", rank=4, alpha=8.0).check_upload(update, g)
    assert "cannot take heterogeneous ranks" in problem
    too_big = random_updates(rng, g, [4], [1.0])[0]
    too_big.metrics["lora-rank"] = 6
    assert "not in 1..4" in strategy("flora", rank=4, alpha=8.0).check_upload(too_big, g)
    # FFA sites send no A; an A in the upload is an error
    with_a = random_updates(rng, g, [4], [1.0])[0]
    assert "unexpected" in strategy("ffa", rank=4, alpha=8.0).check_upload(with_a, g)


def test_base_correction_stays_factored_until_dense_is_cheaper():
    rng = np.random.default_rng(4)
    c = BaseCorrection()
    u, v = rng.normal(size=(6, 2)), rng.normal(size=(2, 5))
    c.add("x", u, v)                              # R = 2: 2·11 = 22 < 30
    assert set(c.layers["x"]) == {"u", "v"}
    c.add("x", u, v)                              # R = 4: 44 >= 30 -> dense
    assert set(c.layers["x"]) == {"dense"}
    assert np.allclose(c.dense("x"), 2 * u @ v, atol=1e-5)
    fu, fv = c.factors("x")                       # SVD back to factors, exact
    assert fu.shape[1] <= 2 and np.allclose(fu @ fv, 2 * u @ v, atol=1e-4)
    wire = BaseCorrection.from_arrays(c.to_arrays())
    assert np.array_equal(wire.dense("x"), c.dense("x"))
    with pytest.raises(ValueError, match="incomplete"):
        BaseCorrection.from_arrays({"y#u": np.zeros((2, 1), np.float32)})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_round_trip_gives_the_identical_next_aggregate(name, tmp_path):
    rng = np.random.default_rng(5)
    kwargs = dict(rank=4, alpha=8.0)
    first, resumed = strategy(name, **kwargs), strategy(name, **kwargs)
    g = random_state(rng)
    n = 5
    r1 = random_updates(rng, g, [4] * n, [1.0 + i for i in range(n)], send_a=not first.freeze_a)
    r2 = random_updates(rng, g, [4] * n, [1.0 + i for i in range(n)], send_a=not first.freeze_a)
    if first.local_b:
        for u in r1 + r2:
            u.delta = {k: v for k, v in u.delta.items() if ".lora_B." not in k}
    g1 = first.aggregate(g, r1)
    # through a real checkpoint on disk, as a restarted server would read it
    rundir = RunDirectory(tmp_path)
    rundir.save_checkpoint(Checkpoint(1, g1, {"strategy": first.state_dict()}))
    ckpt = rundir.load_checkpoint()
    resumed.load_state_dict(ckpt.state["strategy"])
    a, b = first.aggregate(g1, r2), resumed.aggregate(ckpt.global_state, r2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    if first.base_correction():
        assert first.base_correction().to_arrays().keys() == resumed.base_correction().to_arrays().keys()
        for k, v in first.base_correction().to_arrays().items():
            assert np.array_equal(v, resumed.base_correction().to_arrays()[k])


def test_stateless_strategies_refuse_foreign_state():
    with pytest.raises(ValueError, match="keeps no state"):
        strategy("fedit").load_state_dict({"velocity": {}})


def test_pad_and_truncate_are_inverse():
    rng = np.random.default_rng(6)
    g = random_state(rng)
    assert all(np.array_equal(pad(truncate(g, 4), g)[k], g[k]) for k in g)


def _by_site_and_by_sum(name):
    """The next adapter from each site's update, and from one update: their weighted mean (all that
    secure aggregation reveals, and what client-level DP noises)."""
    rng = np.random.default_rng(8)
    by_site, by_sum = strategy(name, rank=4, alpha=8.0), strategy(name, rank=4, alpha=8.0)
    g = random_state(rng)
    updates = random_updates(rng, g, [4] * 5, [1.0, 2.0, 3.0, 4.0, 5.0], send_a=not by_site.freeze_a)
    if by_site.local_b:
        for u in updates:
            u.delta = {k: v for k, v in u.delta.items() if ".lora_B." not in k}
    mean = SiteUpdate("sum of the sites", sum(u.weight for u in updates), weighted_mean(updates))
    a, b = by_site.aggregate(g, updates), by_sum.aggregate(g, [mean])
    for s, state in ((by_site, a), (by_sum, b)):  # what folds into the base is part of the model
        if s.base_correction():
            state.update({f"correction:{k}": v for k, v in s.base_correction().to_arrays().items()})
    return a, b


@pytest.mark.parametrize("name", [n for n, c in STRATEGIES.items() if c.linear])
def test_linear_strategies_need_only_the_weighted_sum(name):
    a, b = _by_site_and_by_sum(name)
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("name", [n for n, c in STRATEGIES.items() if not c.linear and "krum" not in n])
def test_non_linear_strategies_are_not_a_function_of_the_sum(name):
    """Their declaration is honest: the weighted mean alone gives another adapter (Krum needs 5 updates)."""
    a, b = _by_site_and_by_sum(name)
    assert a.keys() != b.keys() or not all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
