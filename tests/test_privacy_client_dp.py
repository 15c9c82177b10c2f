"""Client-level DP: clipping, the noise's standard deviation, adaptive clipping,
and fedlora's accounting of it against a closed form."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedlora import wire
from fedlora.privacy.accounting import Mechanism, epsilon_prv, epsilon_rdp
from fedlora.privacy.client_dp import (CLIENT_DP_SITE, ClientLevelDP, ClientLevelDPStrategy, clip_update, l2_norm,
                                       next_clip_norm, noised_mean,
                                       update_noise_multiplier, utility_warning)
from fedlora.config import load_config
from fedlora.strategies.base import RoundInfo, SiteUpdate, Strategy

SHAPES = {"a": (50, 40), "b": (40, 50)}


def _update(scale: float, rng) -> dict[str, np.ndarray]:
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def test_clipping_bounds_each_update():
    rng = np.random.default_rng(0)
    big, small = _update(1.0, rng), _update(1e-4, rng)
    clipped, norm_before = clip_update(big, 0.5)
    assert norm_before > 0.5 and l2_norm(clipped) == pytest.approx(0.5)
    unchanged, _ = clip_update(small, 0.5)
    assert all(np.allclose(unchanged[k], small[k]) for k in small)


def test_noise_on_the_mean_has_std_z_c_over_k():
    z, clip, k = 1.3, 0.2, 4
    zeros = [{n: np.zeros(s, np.float32) for n, s in SHAPES.items()} for _ in range(k)]
    mean = noised_mean(zeros, zeros[0], clip, z, k, np.random.default_rng(1))
    values = np.concatenate([v.ravel() for v in mean.values()])  # 4,000 draws
    assert values.std() == pytest.approx(z * clip / k, rel=0.05)
    assert abs(values.mean()) < 4 * z * clip / k / math.sqrt(values.size)


class Recorder(Strategy):
    """A strategy that keeps what it was asked to aggregate."""

    name = "recorder"

    def aggregate(self, global_state, updates):
        self.seen = updates
        return global_state

    def combine(self, global_state, updates):
        raise NotImplementedError


def test_the_wrapped_strategy_sees_one_noised_mean_of_clipped_updates():
    config = load_config(None, ["privacy.client-dp=true", "privacy.client-clip-norm=0.5",
                                "privacy.client-noise-multiplier=0.8"])
    inner = Recorder()
    wrapped = ClientLevelDPStrategy(inner, ClientLevelDP.from_config(config.privacy), rounds=5, budget=100.0)
    wrapped.mechanism.rng = np.random.default_rng(7)
    rng = np.random.default_rng(0)
    updates = [SiteUpdate(f"s{i}", 100.0 * (i + 1), _update(1.0, rng)) for i in range(3)]
    wrapped.begin_round(RoundInfo(1, sampled=3, available=4, sample_rate=0.75))  # 4 could train, q = 0.75
    wrapped.aggregate({k: np.zeros(shape, np.float32) for k, shape in SHAPES.items()}, updates)
    out = inner.seen
    assert len(out) == 1 and out[0].site == CLIENT_DP_SITE and out[0].metrics[wire.NUM_EXAMPLES] == 3
    # Same noise, computed by hand: clip to 0.5, sum, N(0, (0.8·0.5)²), / 3 sites asked; weights ignored.
    noise = np.random.default_rng(7)
    for k, shape in SHAPES.items():
        total = sum(clip_update(u.delta, 0.5)[0][k] for u in updates)
        expected = (total + noise.normal(0.0, 0.4, size=shape)) / 3
        np.testing.assert_allclose(out[0].delta[k], expected.astype(np.float32), rtol=1e-5, atol=1e-7)
    assert wrapped.mechanism.history == [Mechanism(0.8, 0.75, 1)]
    inner._round_metrics = {}
    assert wrapped.round_metrics()["client_epsilon"] == pytest.approx(epsilon_prv([Mechanism(0.8, 0.75, 1)], 1e-5))
    assert wrapped.guarantees()["client_level"]["unit"] == "site"


def test_adaptive_clipping_tracks_the_quantile_and_keeps_the_accounted_noise():
    assert next_clip_norm(1.0, 1.0, 0.5, 0.2) < 1.0 < next_clip_norm(1.0, 0.0, 0.5, 0.2)
    z, sigma_b = 1.0, 2.0
    z_update = update_noise_multiplier(z, sigma_b)
    assert z_update ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2)  # Andrew et al., Thm 1
    with pytest.raises(ValueError):
        update_noise_multiplier(1.0, 0.4)
    dp = ClientLevelDP(z, 0.01, 1e-5, adaptive=True, count_stddev=sigma_b, rng=np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for _ in range(30):  # every update is far above the clip norm: it must grow
        dp.round([_update(1.0, rng) for _ in range(20)], _update(0.0, rng), sample_rate=1.0, available=20)
    assert dp.clip_norm > 0.1


def test_client_level_accounting_matches_the_gaussian_closed_form():
    # Every site every round (q = 1): R rounds at z are one Gaussian mechanism with mu = sqrt(R)/z.
    z, rounds, delta = 1.08, 5, 1e-3
    dp = ClientLevelDP(z, 0.1, delta, rng=np.random.default_rng(0))
    for _ in range(rounds):
        dp.round([_update(0.1, np.random.default_rng(2))] * 4, _update(0.0, np.random.default_rng(3)), 1.0, 4)
    mu = math.sqrt(rounds) / z
    exact = brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 50)
    spent = dp.spent()
    assert exact - 1e-3 <= spent["epsilon"] <= exact + 0.011
    assert spent["epsilon_rdp"] == pytest.approx(epsilon_rdp([Mechanism(z, 1.0, rounds)], delta))
    restored = ClientLevelDP(z, 0.1, delta)
    restored.load_state_dict(dp.state_dict())
    assert restored.spent() == spent


def test_the_warning_gives_numbers():
    text = utility_warning(1.0, 0.1, 4, 100_000, 7.9, 1e-3, 5)
    assert "0.025 per coordinate" in text and "~317 sites per round" in text
