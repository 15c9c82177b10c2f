"""The privacy audit's findings, each replayed against an independent computation
(Google's dp-accounting, a closed form, or the attack itself), so each fails on
the behaviour the audit measured and passes now."""

from __future__ import annotations

import pytest

from fedlora.privacy.budget import SITE_DELTA, resolve_budget
from fedlora.privacy.site import SiteAccountant

dp_accounting = pytest.importorskip("dp_accounting")


def _pld_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps, by dp-accounting's PLD accountant."""
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    oracle = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    oracle.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return oracle.get_epsilon(delta)


# -- a site bounds delta itself ---------------------------------------------------------------
def test_a_coordinators_large_delta_cannot_weaken_a_sites_epsilon(tmp_path):
    """The audit: node epsilon 1, coordinator delta 0.5: sigma fell from 6.19 to 0.90."""
    units, q, steps, rounds = 256, 0.25, 8, 5  # the default scenario's site: 256 records, batch 64, 2 epochs
    budget = resolve_budget(8.0, 0.5, {"privacy-epsilon": 1.0}, units)
    assert budget.delta == SITE_DELTA and "site default" in budget.source
    plan = SiteAccountant(tmp_path, budget, "prv").plan_round(1, q, steps, rounds_left=rounds)
    # dp-accounting, at the delta the site guarantees, for the whole run at this sigma: within the budget
    assert _pld_epsilon(plan.noise_multiplier, q, steps * rounds, SITE_DELTA) <= 1.0 * 1.01
    assert plan.noise_multiplier > 5  # not the 0.90 the coordinator's delta would have bought


def test_a_site_caps_delta_below_one_over_its_units_and_its_own_setting_wins():
    assert resolve_budget(8.0, 1e-3, {}, units=1_000_000).delta == pytest.approx(1e-7)  # 1/(10 n)
    assert resolve_budget(8.0, 1e-3, {"privacy-delta": 1e-6}, units=100).delta == 1e-6
    assert resolve_budget(8.0, 1e-8, {"privacy-delta": 1e-6}, units=100).delta == 1e-8  # the stricter wins
