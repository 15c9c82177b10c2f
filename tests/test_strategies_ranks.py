"""Heterogeneous ranks (sites at 8, 4, 4, 2 under lora.rank = 8): a site never erases the
components it never held, a rank-r site of an exact-ΔW strategy gets the best rank-r
approximation of the global adapter, and aggregation_error is measured against the sites' full
local ΔW."""

import numpy as np
import pytest

from fedlora.strategies import STRATEGIES, SiteUpdate
from fedlora.strategies.base import local_adapter
from fedlora.strategies.factors import aggregation_error, delta_w, lora_layers, pad, svd_ordered, truncate
from fedlora.wire import ARRAYS, LORA_RANK
from strategy_cases import random_state, random_updates, strategy

RANKS, WEIGHTS = [8, 4, 4, 2], [1.0, 2.0, 3.0, 4.0]
RANK, ALPHA, SCALE = 8, 16.0, 2.0
HETEROGENEOUS = [n for n, c in STRATEGIES.items() if c.heterogeneous_ranks]


def _zero_updates(s, global_state, ranks=RANKS):
    """What each site sends after a round in which it changed nothing."""
    out = []
    for i, (rank, weight) in enumerate(zip(ranks, WEIGHTS)):
        view = truncate(global_state, rank)
        delta = {k: np.zeros_like(v) for k, v in view.items() if s.uploaded(k)}
        out.append(SiteUpdate(f"site-{i}", weight, delta, {LORA_RANK: rank}))
    return out


def _model_delta_w(s, state):
    """{layer: ΔW} of the global model: scale·B·A plus the base correction (if any)."""
    c = s.base_correction()
    return {layer: delta_w(state[a], state[b], SCALE) + (c.dense(layer) if c and layer in c.layers else 0.0)
            for layer, (a, b) in lora_layers(state).items()}


def _relative_change(before, after):
    num = sum(np.sum((after[k] - before[k]) ** 2) for k in before)
    return float(np.sqrt(num / sum(np.sum(v ** 2) for v in before.values())))


def _global(s, rng):
    """A global adapter as the strategy would hold it between rounds."""
    g = random_state(rng, rank=RANK, d=16, k=12)
    if s.name == "flora":                  # the adapter restarts at B = 0 every round
        g = {k: np.zeros_like(v) if ".lora_B." in k else v for k, v in g.items()}
    if s.name == "fedex":                  # after a mixed-rank round the adapter is in SVD order
        for a, b in lora_layers(g).values():
            g[a], g[b] = svd_ordered(g[a], g[b])
    return g


@pytest.mark.parametrize("name", HETEROGENEOUS)
def test_a_round_of_zero_updates_changes_nothing(name):
    rng = np.random.default_rng(0)
    s = strategy(name, rank=RANK, alpha=ALPHA)   # fresh: a server optimizer's moments are zero
    if s.folds_into_base:                        # a correction from an earlier, real round
        g0 = _global(s, rng)
        s.aggregate(g0, random_updates(rng, g0, RANKS, WEIGHTS))
    g = _global(s, rng)
    before = _model_delta_w(s, g)
    new = s.aggregate(g, _zero_updates(s, g))
    assert _relative_change(before, _model_delta_w(s, new)) <= 1e-6
    if s.folds_into_base:   # the residual of a zero round is zero up to float32 rounding
        assert all(np.allclose(new[k], g[k], rtol=1e-5, atol=1e-5) for k in g)
    else:                   # zero delta, zero moments: bit-exact
        assert all(np.array_equal(new[k], g[k]) for k in g)
    if not s.personalized:
        assert s.round_metrics()["aggregation_error"] <= 1e-6


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_with_momentum_a_zero_round_moves_only_by_the_momentum_it_carries(name):
    """Zero updates at mixed ranks give the same step as zero updates at full rank: the momentum
    built up in earlier rounds, nothing erased."""
    rng = np.random.default_rng(1)
    mixed, full = strategy(name, rank=RANK, alpha=ALPHA), strategy(name, rank=RANK, alpha=ALPHA)
    g = random_state(rng, rank=RANK, d=16, k=12)
    warm = random_updates(rng, g, [RANK] * 4, WEIGHTS)
    g1, g1_full = mixed.aggregate(g, warm), full.aggregate(g, warm)
    assert all(np.array_equal(g1[k], g1_full[k]) for k in g)
    a, b = mixed.aggregate(g1, _zero_updates(mixed, g1)), full.aggregate(g1, _zero_updates(full, g1, [RANK] * 4))
    assert all(np.array_equal(a[k], b[k]) for k in g)
    assert any(not np.array_equal(a[k], g1[k]) for k in g)   # momentum does move it


def test_a_site_keeps_the_global_components_beyond_its_rank():
    rng = np.random.default_rng(2)
    g = random_state(rng, rank=RANK)
    update = random_updates(rng, g, [2], [1.0])[0]
    local = local_adapter(g, update.delta)
    for a, b in lora_layers(g).values():
        assert np.array_equal(local[a][2:], g[a][2:]) and np.array_equal(local[b][:, 2:], g[b][:, 2:])
        assert np.allclose(local[a][:2], g[a][:2] + update.delta[a])


@pytest.mark.parametrize("name", ["ffa", "fedex", "flora"])
def test_exact_strategies_stay_exact_at_mixed_ranks(name):
    rng = np.random.default_rng(3)
    s = strategy(name, rank=RANK, alpha=ALPHA)
    g = _global(s, rng)
    for _ in range(3):
        g = s.aggregate(g, random_updates(rng, g, RANKS, WEIGHTS, send_a=not s.freeze_a))
        assert s.round_metrics()["aggregation_error"] <= 1e-5


def test_aggregation_error_shows_an_aggregate_that_erases():
    """The old arithmetic (a site's local adapter zero-padded back to rank 8) read ~1e-8 for FFA
    while a round of zero updates moved ΔW by a third; against the sites' full local ΔW it reads
    that third."""
    rng = np.random.default_rng(4)
    g = random_state(rng, rank=RANK, d=16, k=12)
    s = strategy("ffa", rank=RANK, alpha=ALPHA)
    updates = _zero_updates(s, g)
    erasing_locals = [pad({k: v + u.delta.get(k, 0.0) for k, v in truncate(g, u.rank).items()}, g) for u in updates]
    erasing = {k: sum(w * loc[k] for w, loc in zip(WEIGHTS, erasing_locals)) / sum(WEIGHTS) for k in g}
    erasing = {k: g[k] if ".lora_A." in k else v for k, v in erasing.items()}   # FFA keeps A
    old_error = aggregation_error(erasing, erasing_locals, WEIGHTS, SCALE)
    new_error = aggregation_error(erasing, [local_adapter(g, u.delta) for u in updates], WEIGHTS, SCALE)
    moved = _relative_change(_model_delta_w(s, g), _model_delta_w(s, erasing))
    assert old_error < 1e-6
    assert new_error == pytest.approx(moved, rel=1e-6) and new_error > 0.1


# -- SVD downlink ---------------------------------------------------------------------------------

def test_svd_order_keeps_the_product_and_orders_the_components():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(8, 12)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    a2, b2 = svd_ordered(a, b)
    assert np.allclose(b2 @ a2, b @ a, atol=1e-4)
    sigma = np.linalg.svd((b @ a).astype(np.float64), compute_uv=False)
    for r in range(1, 8):
        tail = np.linalg.norm(b.astype(np.float64) @ a - b2[:, :r].astype(np.float64) @ a2[:r])
        assert tail == pytest.approx(np.sqrt(np.sum(sigma[r:] ** 2)), rel=1e-4)
    a3, b3 = svd_ordered(a2, b2)                       # ordering an ordered adapter changes nothing
    assert np.allclose(a3, a2, atol=1e-5) and np.allclose(b3, b2, atol=1e-5)
    # B = 0: nothing to order, and A's row space (where training starts) is kept
    a4, b4 = svd_ordered(a, np.zeros_like(b))
    assert not np.any(b4) and np.linalg.matrix_rank(np.vstack([a, a4]), tol=1e-4) == 8


def _site_model_error(s, new_state, rank):
    """‖ΔW_global − ΔW of the model a rank-r site builds from the downlink‖, ΔW including the base."""
    sent = truncate(s.downlink(new_state)[ARRAYS], rank)
    got = truncate(new_state, rank)
    assert all(np.array_equal(sent[k], got[k]) for k in sent)
    full, num = _model_delta_w(s, new_state), 0.0
    c = s.base_correction()
    for layer, (a, b) in lora_layers(sent).items():
        site = delta_w(sent[a], sent[b], SCALE) + (c.dense(layer) if c else 0.0)
        num += np.sum((full[layer] - site) ** 2)
    return float(np.sqrt(num))


def test_fedex_sends_a_rank_r_site_the_best_rank_r_adapter():
    rng = np.random.default_rng(6)
    s = strategy("fedex", rank=RANK, alpha=ALPHA)
    g = random_state(rng, rank=RANK, d=16, k=12)
    new = s.aggregate(g, random_updates(rng, g, RANKS, WEIGHTS))
    assert s.round_metrics()["aggregation_error"] <= 1e-5
    for rank in (2, 4):
        optimal = np.sqrt(sum(np.sum(np.linalg.svd(delta_w(new[a], new[b], SCALE), compute_uv=False)[rank:] ** 2)
                              for a, b in lora_layers(new).values()))
        first_r = _site_model_error(s, g, rank)  # for comparison: the first r of an unordered adapter
        assert _site_model_error(s, new, rank) == pytest.approx(optimal, rel=1e-4)
        assert optimal < first_r
    # a zero round through that downlink changes nothing: adapter and ΔW stay
    before = _model_delta_w(s, new)
    again = s.aggregate(new, _zero_updates(s, new))
    assert _relative_change(before, _model_delta_w(s, again)) <= 1e-6
    assert all(np.allclose(again[k], new[k], rtol=1e-5, atol=1e-5) for k in new)


def test_flora_sends_every_site_the_whole_global_update():
    """FLoRA's adapter restarts at B = 0 and the global ΔW lives in the base correction, which every
    site receives in full: a rank-r site's model is the global one (error 0, below Eckart–Young)."""
    rng = np.random.default_rng(7)
    s = strategy("flora", rank=RANK, alpha=ALPHA)
    g = _global(s, rng)
    new = s.aggregate(g, random_updates(rng, g, RANKS, WEIGHTS))
    for rank in (2, 4):
        assert _site_model_error(s, new, rank) == 0.0


@pytest.mark.parametrize("name", ["fedit", "ffa", "fedsa", "fedprox"])
def test_factor_averaging_moves_each_component_by_the_mean_of_the_zero_padded_updates(name):
    """No SVD order where the factors themselves are averaged: each component moves by Σ wᵢ δᵢ / Σ wᵢ,
    δᵢ = 0 at sites that never held it (their full local adapter keeps the global value), in the
    global's own basis; what sites do not send (FFA's A, FedSA's B) stays bit for bit."""
    rng = np.random.default_rng(8)
    s = strategy(name, rank=RANK, alpha=ALPHA)
    g = random_state(rng, rank=RANK, d=16, k=12)
    updates = random_updates(rng, g, RANKS, WEIGHTS, send_a=not s.freeze_a)
    for u in updates:
        u.delta = {k: v for k, v in u.delta.items() if s.uploaded(k)}
    new = s.aggregate(g, updates)
    for k in g:
        if not s.uploaded(k):
            assert np.array_equal(new[k], g[k])
            continue
        padded = [pad({k: u.delta[k]}, g)[k] for u in updates]
        expected = g[k] + sum(w * d for w, d in zip(WEIGHTS, padded)) / sum(WEIGHTS)
        assert np.allclose(new[k], expected, atol=1e-6)
