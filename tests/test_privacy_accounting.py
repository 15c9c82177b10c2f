"""Epsilon from fedlora's accounting against independent oracles: Google's
dp-accounting (RDP and PLD) and the closed form of the Gaussian mechanism."""

import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedlora.privacy.accounting import (RDP_ORDERS, CalibrationError, Mechanism, calibrate_noise, canonical,
                                        epsilon, epsilon_by_round, epsilon_prv, epsilon_rdp)

dp_accounting = pytest.importorskip("dp_accounting")

DELTA = 1e-5
CASES = [(1.0, 0.0128, 79 * 20), (2.55, 1.0, 6), (4.0, 0.01, 500)]


def _event(sigma, q, steps):
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    event = gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
    return dp_accounting.SelfComposedDpEvent(event, steps)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/std = mu (Balle & Wang 2018)."""
    def excess(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta
    return brentq(excess, 0.0, 100.0)


@pytest.mark.parametrize("sigma,q,steps", CASES)
def test_rdp_matches_dp_accounting(sigma, q, steps):
    oracle = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    oracle.compose(_event(sigma, q, steps))
    assert epsilon_rdp([Mechanism(sigma, q, steps)], DELTA) == pytest.approx(oracle.get_epsilon(DELTA), rel=2e-3)


@pytest.mark.parametrize("sigma,q,steps", CASES)
def test_prv_is_a_tight_upper_bound_of_pld(sigma, q, steps):
    oracle = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    oracle.compose(_event(sigma, q, steps))
    pld = oracle.get_epsilon(DELTA)
    prv = epsilon_prv([Mechanism(sigma, q, steps)], DELTA)
    assert pld - 5e-3 <= prv <= pld * 1.01 + 0.01


def test_prv_matches_the_gaussian_closed_form():
    # Without subsampling, T steps at sigma are one Gaussian mechanism with mu = sqrt(T) / sigma.
    for sigma, steps in [(2.55, 6), (1.0, 1), (5.0, 20)]:
        exact = gaussian_epsilon(math.sqrt(steps) / sigma, DELTA)
        prv = epsilon_prv([Mechanism(sigma, 1.0, steps)], DELTA)
        assert exact - 1e-3 <= prv <= exact + 0.011
        assert epsilon_rdp([Mechanism(sigma, 1.0, steps)], DELTA) >= exact  # RDP is looser, never tighter


def test_rounds_compose_as_one_long_run():
    split = [Mechanism(1.1, 0.05, 40)] * 5
    assert canonical(split) == (Mechanism(1.1, 0.05, 200),)
    assert epsilon(split, DELTA, "rdp") == epsilon([Mechanism(1.1, 0.05, 200)], DELTA, "rdp")
    by_round = epsilon_by_round(1.1, 0.05, 40, 5, DELTA, "rdp")
    assert by_round == sorted(by_round) and by_round[-1] == epsilon(split, DELTA, "rdp")


def test_degenerate_histories():
    assert epsilon([], DELTA) == 0.0
    assert epsilon([Mechanism(1.0, 0.1, 0)], DELTA) == 0.0
    assert math.isinf(epsilon([Mechanism(0.0, 0.1, 3)], DELTA))
    with pytest.raises(ValueError):
        epsilon([Mechanism(1.0, 1.5, 3)], DELTA)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_finds_the_smallest_sigma_that_fits(accountant):
    target, q, steps = 3.0, 0.25, 40
    sigma = calibrate_noise(target, DELTA, q, steps, accountant=accountant)
    assert epsilon([Mechanism(sigma, q, steps)], DELTA, accountant) <= target
    assert epsilon([Mechanism(sigma * 0.99, q, steps)], DELTA, accountant) > target


def test_calibration_accounts_for_what_is_spent():
    spent = [Mechanism(2.0, 0.25, 16)]
    sigma = calibrate_noise(3.0, DELTA, 0.25, 24, spent=spent, accountant="rdp")
    assert epsilon(spent + [Mechanism(sigma, 0.25, 24)], DELTA, "rdp") <= 3.0
    with pytest.raises(CalibrationError):
        calibrate_noise(0.5, DELTA, 0.25, 24, spent=spent, accountant="rdp")
