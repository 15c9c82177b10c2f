"""Distributed DP under secure aggregation: clipping, the noise each site adds, and its accounting."""

import math

import numpy as np
import pytest

from fedlora.privacy.secagg import SecAggConfig, run_in_memory
from fedlora.privacy.secagg.distributed_dp import clip_and_noise, epsilon_exact, site_noise_std, spent
from fedlora.privacy.secagg.updates import Layout, decode, encode


def test_a_site_clips_its_update_then_adds_noise_of_std_sigma_c_over_sqrt_t():
    rng = np.random.default_rng(1)
    delta = {"a": rng.normal(0, 1, (400, 500)).astype(np.float32)}  # norm ~ 450, far above C
    sigma, clip, t = 2.0, 0.5, 4
    std = site_noise_std(sigma, clip, t)
    assert std == pytest.approx(0.5)
    noised, norm = clip_and_noise(delta, clip, std, np.random.default_rng(2))
    assert norm > 400
    noise = noised["a"] - delta["a"] * (clip / norm)
    # 200k samples: the sample std is within 1% of the truth with overwhelming probability (SE 0.16%).
    assert np.std(noise) == pytest.approx(std, rel=0.01)
    assert abs(np.mean(noise)) < 5 * std / math.sqrt(noise.size)
    small = {"a": np.full((2, 2), 0.01, dtype=np.float32)}
    kept, _ = clip_and_noise(small, clip, 0.0)
    assert np.array_equal(kept["a"], small["a"].astype(np.float64))  # within the bound: untouched


def test_noise_is_fresh_for_every_call_without_a_given_generator():
    delta = {"a": np.zeros(1000, dtype=np.float32)}
    first, _ = clip_and_noise(delta, 1.0, 1.0)
    second, _ = clip_and_noise(delta, 1.0, 1.0)
    assert not np.allclose(first["a"], second["a"])


@pytest.mark.parametrize("n, dropped", [(5, 0), (6, 2)])
def test_the_revealed_sum_carries_at_least_sigma_c_of_noise(n, dropped):
    """Sites with zero updates: what the coordinator sees is the noise alone."""
    sigma, clip, length = 1.5, 0.2, 40_000
    config = SecAggConfig()
    t = config.resolve(n).threshold
    std = site_noise_std(sigma, clip, t)
    layout = Layout(("a",), ((length,),))
    rng = np.random.default_rng(n)
    vectors = {}
    for i in range(n):
        noised, _ = clip_and_noise({"a": np.zeros(length, dtype=np.float32)}, clip, std, rng)
        vectors[100 + i] = encode(noised, ["a"], 1.0, None, 1.0).vector
    result = run_in_memory(vectors, config=config, dropouts_after_keys=list(vectors)[:dropped])
    mean = decode(result.sum, layout, 1.0, 1.0, result.max_error)
    assert mean.weight == pytest.approx(n - dropped) and mean.loss is None
    revealed_sum = mean.delta["a"].astype(np.float64) * (n - dropped)
    expected = sigma * clip * math.sqrt((n - dropped) / t)
    assert len(result.included) >= t and expected >= sigma * clip
    assert np.std(revealed_sum) == pytest.approx(expected, rel=0.03)  # SE 0.35% at 40k samples


def test_exact_epsilon_of_composed_gaussian_releases():
    # One release at sigma = 1, delta = 1e-5: 4.38 (the analytic Gaussian mechanism, Balle & Wang 2018).
    assert epsilon_exact(1.0, 1, 1e-5) == pytest.approx(4.377, abs=2e-3)
    # T releases at sigma are one release at sigma / sqrt(T).
    assert epsilon_exact(3.0, 9, 1e-5) == pytest.approx(epsilon_exact(1.0, 1, 1e-5), rel=1e-9)
    assert epsilon_exact(2.0, 0, 1e-5) == 0.0 and epsilon_exact(0.0, 3, 1e-5) == math.inf
    for sigma, rounds in [(1.0, 1), (3.0, 20), (5.0, 50)]:
        report = spent(sigma, rounds, 1e-5)
        assert report["epsilon"] <= report["epsilon_rdp"] <= 1.15 * report["epsilon"]  # RDP is an upper bound


def test_exact_epsilon_agrees_with_an_independent_pld_accountant():
    dp_accounting = pytest.importorskip("dp_accounting")
    for sigma, rounds in [(1.0, 1), (3.0, 20)]:
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), rounds)
        accountant = dp_accounting.pld.PLDAccountant()
        accountant.compose(event)
        assert epsilon_exact(sigma, rounds, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=0.01)
