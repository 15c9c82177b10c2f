"""Each strategy's arithmetic against a hand-computed example.

The scalar cases use one adapted layer with d = k = r = 1 and scale
alpha / rank = 2, so ΔW = 2·B·A can be followed by hand. Global adapter:
A = 1, B = 0, head = 0. Site 1 (weight 1) learns δA = +1, δB = 2; site 2
(weight 1) learns δA = −1, δB = 4: their local adapters are (A, B) = (2, 2)
and (0, 4), so ΔW₁ = 8, ΔW₂ = 0 and the weighted mean is Σ wᵢ ΔWᵢ = 4.
"""

import numpy as np
import pytest

from fedlora.strategies import SiteUpdate
from fedlora.strategies.factors import aggregation_error
from strategy_cases import a_key, b_key, scalar_state, strategy

A, B, HEAD = a_key("l"), b_key("l"), "m.head.weight"
G = scalar_state(a=1.0, b=0.0)


def _sites(send_a=True, send_b=True, heads=(1.0, 3.0)):
    out = []
    for name, da, db, head in (("s1", 1.0, 2.0, heads[0]), ("s2", -1.0, 4.0, heads[1])):
        delta = {HEAD: np.array([head], np.float32)}
        if send_a:
            delta[A] = np.array([[da]], np.float32)
        if send_b:
            delta[B] = np.array([[db]], np.float32)
        out.append(SiteUpdate(name, 1.0, delta))
    return out


def test_fedit_averages_each_factor_and_reports_its_real_error():
    s = strategy("fedit")
    new = s.aggregate(G, _sites())
    assert new[A][0, 0] == pytest.approx(1.0) and new[B][0, 0] == pytest.approx(3.0)
    assert new[HEAD][0] == pytest.approx(2.0)
    # ΔW_global = 2·3·1 = 6 against the mean 4: |6 − 4| / 4 = 0.5
    assert s.round_metrics()["aggregation_error"] == pytest.approx(0.5)


def test_ffa_keeps_a_and_averages_b_exactly():
    s = strategy("ffa")
    # FFA sites send no A: their local adapters are (1, 2) and (1, 4), mean ΔW = 2·3·1 = 6.
    new = s.aggregate(G, _sites(send_a=False))
    assert new[A][0, 0] == 1.0 and new[B][0, 0] == pytest.approx(3.0)
    assert s.round_metrics()["aggregation_error"] == pytest.approx(0.0, abs=1e-12)


def test_fedex_folds_the_residual_into_the_base():
    s = strategy("fedex")
    new = s.aggregate(G, _sites())
    assert new[A][0, 0] == pytest.approx(1.0) and new[B][0, 0] == pytest.approx(3.0)
    # residual = 2·(mean B·A − B'·A') = 2·(2 − 3) = −2
    assert s.base_correction().dense("m.l")[0, 0] == pytest.approx(-2.0)
    assert s.round_metrics()["aggregation_error"] == pytest.approx(0.0, abs=1e-7)


def test_flora_stacks_into_the_base_and_restarts_the_adapter():
    s = strategy("flora")
    new = s.aggregate(G, _sites())
    assert new[A][0, 0] == 1.0 and new[B][0, 0] == 0.0   # restart: A = initialization, B = 0
    assert new[HEAD][0] == pytest.approx(2.0)
    # U = [2·½·2, 2·½·4] = [2, 4], V = [2; 0]: U·V = 4 = Σ wᵢ ΔWᵢ (a 1 × 1 layer is kept dense)
    assert s.base_correction().dense("m.l")[0, 0] == pytest.approx(4.0)
    assert s.round_metrics()["aggregation_error"] == pytest.approx(0.0, abs=1e-7)


def test_fedsa_averages_a_keeps_b_and_reports_no_global_error():
    s = strategy("fedsa")
    new = s.aggregate(G, _sites(send_b=False))
    assert new[A][0, 0] == pytest.approx(1.0) and new[B][0, 0] == 0.0
    assert s.round_metrics()["aggregation_error"] is None
    assert "m.l.lora_B.default.weight" not in s.downlink(G)["arrays"]


def test_fedavgm_momentum_by_hand():
    s = strategy("fedavgm", "strategy.fedavgm.server-lr=1.0", "strategy.fedavgm.momentum=0.9")
    x1 = s.aggregate(G, _sites(heads=(1.0, 1.0)))          # v = 1, x = 1
    x2 = s.aggregate(x1, _sites(heads=(1.0, 1.0)))         # v = 0.9 + 1 = 1.9, x = 2.9
    assert x1[HEAD][0] == pytest.approx(1.0) and x2[HEAD][0] == pytest.approx(2.9)


@pytest.mark.parametrize("name, v1", [
    ("fedadam", 0.99 * 0.01 + 0.01 * 1.0),     # β₂·τ² + (1 − β₂)·g²
    ("fedyogi", 0.01 + 0.01 * 1.0),            # τ² − (1 − β₂)·g²·sign(τ² − g²)
    ("fedadagrad", 0.01 + 1.0),                # τ² + g²
])
def test_adaptive_server_optimizers_by_hand(name, v1):
    beta2 = [f"strategy.{name}.beta2=0.99"] if name != "fedadagrad" else []  # Adagrad keeps the sum of squares
    s = strategy(name, f"strategy.{name}.server-lr=0.1", f"strategy.{name}.tau=0.1", f"strategy.{name}.beta1=0.9",
                 *beta2)
    x1 = s.aggregate(G, _sites(heads=(1.0, 1.0)))          # g = 1, m = 0.1
    assert x1[HEAD][0] == pytest.approx(0.1 * 0.1 / (np.sqrt(v1) + 0.1), rel=1e-5)


def test_fedprox_aggregates_like_fedit_and_sends_mu():
    s = strategy("fedprox", "strategy.fedprox.mu=0.5")
    assert s.client_config(1) == {"proximal-mu": 0.5}
    assert s.aggregate(G, _sites())[B][0, 0] == pytest.approx(3.0)


def _heads(values):
    return [SiteUpdate(f"s{i}", 1.0 + i, {HEAD: np.array([v], np.float32), A: np.zeros((1, 1), np.float32),
                                         B: np.zeros((1, 1), np.float32)}) for i, v in enumerate(values)]


def test_median_ignores_an_outlier_and_the_weights():
    assert strategy("median").aggregate(G, _heads([1.0, 2.0, 100.0]))[HEAD][0] == pytest.approx(2.0)


def test_trimmed_mean_drops_each_end():
    s = strategy("trimmed-mean", "strategy.trimmed-mean.fraction=0.2")
    assert s.aggregate(G, _heads([1.0, 2.0, 3.0, 4.0, 100.0]))[HEAD][0] == pytest.approx(3.0)


def test_krum_and_multi_krum_reject_the_outlier():
    values = [0.0, 0.1, 0.15, -0.3, 10.0]
    # Krum scores (f = 1: sum over the 2 nearest): 0.0325, 0.0125, 0.025, 0.2025, ~97 -> site 1 (0.1)
    krum = strategy("krum", "strategy.krum.byzantine=1")
    assert krum.aggregate(G, _heads(values))[HEAD][0] == pytest.approx(0.1)
    assert krum.round_metrics()["krum_selected"] == ["s1"]
    # Multi-Krum keeps n − f = 4 updates, weighted by 1, 2, 3, 4
    multi = strategy("multi-krum", "strategy.multi-krum.byzantine=1")
    expected = (1 * 0.0 + 2 * 0.1 + 3 * 0.15 + 4 * -0.3) / 10
    assert multi.aggregate(G, _heads(values))[HEAD][0] == pytest.approx(expected, abs=1e-6)
    assert "s4" not in multi.round_metrics()["krum_selected"]


def test_krum_refuses_too_few_updates():
    with pytest.raises(ValueError, match="needs at least 5 updates"):
        strategy("krum").aggregate(G, _heads([0.0, 1.0, 2.0]))


def test_norm_bound_shrinks_the_large_update_only():
    s = strategy("fedit", "strategy.norm-bound=1.0")
    new = s.aggregate(G, _heads([0.5, 4.0]))        # 4 -> 1; weights 1 and 2
    assert new[HEAD][0] == pytest.approx((1 * 0.5 + 2 * 1.0) / 3)
    assert s.round_metrics()["updates_clipped"] == ["s1"]
    rel = strategy("fedit", "strategy.norm-bound-relative=1.0")
    rel.aggregate(G, _heads([1.0, 2.0, 30.0]))     # bound = median norm = 2
    assert rel.round_metrics()["updates_clipped"] == ["s2"]


def test_aggregation_error_by_hand():
    # sites' local (A, B) = (2, 2) and (0, 4); candidate B·A = 3 at scale 1: |3 − 2| / 2
    locals_ = [scalar_state(2.0, 2.0), scalar_state(0.0, 4.0)]
    assert aggregation_error(scalar_state(1.0, 3.0), locals_, [1, 1], 1.0) == pytest.approx(0.5)
    folded = {"m.l": np.array([[-1.0]])}
    assert aggregation_error(scalar_state(1.0, 3.0), locals_, [1, 1], 1.0, folded) == pytest.approx(0.0)
