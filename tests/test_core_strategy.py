import numpy as np
import pytest

from fedlora import config as cfg
from fedlora.arrays import check_update
from fedlora.strategies import SiteUpdate, build_strategy
from fedlora.strategies.base import weighted_mean


def test_fedit_is_the_weighted_mean_of_each_factor_by_hand():
    g = {"A": np.array([[1.0, 0.0]], np.float32), "B": np.array([[2.0], [0.0]], np.float32)}
    u1 = SiteUpdate("s1", 1, {"A": np.array([[1.0, 1.0]], np.float32), "B": np.array([[0.0], [3.0]], np.float32)})
    u2 = SiteUpdate("s2", 3, {"A": np.array([[-1.0, 1.0]], np.float32), "B": np.array([[4.0], [-1.0]], np.float32)})
    new = build_strategy(cfg.load_config(None, ["strategy.name=fedit"])).aggregate(g, [u1, u2])
    # A: 1 + (1*1 + 3*-1)/4 = 0.5 ; 0 + (1 + 3)/4 = 1
    assert np.allclose(new["A"], [[0.5, 1.0]])
    # B: 2 + (0 + 12)/4 = 5 ; 0 + (3 - 3)/4 = 0
    assert np.allclose(new["B"], [[5.0], [0.0]])


def test_weighted_mean_refuses_mismatched_updates_and_zero_weight():
    a = SiteUpdate("a", 1, {"x": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="site b sent tensors"):
        weighted_mean([a, SiteUpdate("b", 1, {"y": np.zeros(2, np.float32)})])
    with pytest.raises(ValueError, match="sum to zero"):
        weighted_mean([SiteUpdate("a", 0, {"x": np.zeros(2, np.float32)})])


def test_broken_updates_are_described():
    ref = {"x": np.zeros((2, 2), np.float32)}
    assert check_update({"x": np.zeros((2, 2), np.float32)}, ref) is None
    assert "NaN" in check_update({"x": np.array([[np.nan, 0], [0, 0]], np.float32)}, ref)
    assert "shape" in check_update({"x": np.zeros((3, 2), np.float32)}, ref)
    assert "missing" in check_update({"y": np.zeros((2, 2), np.float32)}, ref)
    assert "norm" in check_update({"x": np.full((2, 2), 1e7, np.float32)}, ref)
