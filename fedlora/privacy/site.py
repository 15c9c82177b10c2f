"""A site's privacy accountant on its own disk: plan a round, refuse or commit.

Before each round the site projects its epsilon with this round's steps and
refuses if the budget would be exceeded; the check and a reservation of what it
allows are one transaction on the ledger, so two trainings at one site (two
runs, two processes) cannot both pass a check that only one of them fits.
After training, and before the update leaves, the round is committed to the
ledger (fsynced). The spend is always recomputed from the ledger — committed
rounds plus open reservations — so a new process, a crash or a failed upload
never resets it: whatever was reserved stays spent unless the site releases it
because its training failed before anything left.

A site may also cap what one run spends (node config privacy-epsilon-per-run):
then a calibrated sigma fits both the budget and the share, and a run whose
fixed sigma (the run's privacy.noise-multiplier) would pass the share is
refused (or, with privacy-per-run = warn, trained with a loud warning). `forecast` computes all of this for a whole run
before it starts, without writing anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedlora.privacy.accounting import (
    CalibrationError,
    History,
    Mechanism,
    calibrate_noise,
    canonical,
    epsilon,
    epsilon_prv,
    epsilon_rdp,
)
from fedlora.privacy.budget import NODE_EPSILON_PER_RUN, Budget, RunShare
from fedlora.privacy.ledger import Ledger, LedgerTampered, link
from fedlora.versions import library_versions

TRAIN = "train"
RESERVED = "reserved"   # a planned round's spend, held from the check until its commit or release
RELEASED = "released"   # a reservation whose training failed before anything left the site
REFUSED = "refused"


class BudgetExhausted(RuntimeError):
    """This round would take the site past its privacy budget; the site does not train.
    `brief`: the same without the round's figures (under secure aggregation its steps and
    sampling rate must not leave the site)."""

    def __init__(self, message: str, brief: str = ""):
        super().__init__(message)
        self.brief = brief or message


@dataclass(frozen=True)
class RoundPlan:
    round: int
    noise_multiplier: float   # sigma per unit of privacy, as accounted
    sample_rate: float
    steps: int
    epsilon: float            # after this round, by the enforcing accountant
    epsilon_prv: float
    epsilon_rdp: float
    calibrated: bool          # sigma chosen by the site to fit its budget
    run_epsilon: float = 0.0  # this run's rounds alone, this one included
    run_projected: float = 0.0  # this run's rounds alone if it trains every round left at this round's settings
    reservation: str = ""     # the ledger entry that holds this round's spend until it is committed


@dataclass(frozen=True)
class Forecast:
    """What a run would cost the site, computed before it starts (nothing is written)."""
    budget_epsilon: float
    delta: float
    spent_epsilon: float        # before the run
    noise_multiplier: float     # the sigma the site would use (calibrated, or the run's)
    calibrated: bool
    rounds: int                 # the rounds the site would train (every round of the run, until a refusal)
    run_epsilon: float          # the run's rounds alone
    after_epsilon: float        # the site's total after the run
    refuses_at: int = 0         # the run's round the site would refuse (0: none)
    why: str = ""
    share: RunShare | None = None
    anchored: bool = True       # False: its ledger does not hold the head the coordinator last saw

    @property
    def over_share(self) -> bool:
        return self.share is not None and self.run_epsilon > self.share.epsilon


class _Refusal(Exception):
    def __init__(self, projected: float, why: str, limit: str = "privacy budget"):
        super().__init__(why)
        self.projected, self.why, self.limit = projected, why, limit


class SiteAccountant:
    def __init__(self, directory: str | Path, budget: Budget, accountant: str = "prv",
                 site: str = "site", unit: str = "record", share: RunShare | None = None, read_only: bool = False):
        self.ledger = Ledger(directory, read_only)  # read-only: forecasts and audits, which write nothing
        self.budget = budget
        self.accountant = accountant
        self.site = site
        self.unit = unit
        self.share = share

    # -- what has been spent ----------------------------------------------------
    def spending(self, run: str | None = None) -> list[dict[str, Any]]:
        """The ledger entries that count (of one run, if given): every committed round and every open
        reservation."""
        entries = self.ledger.entries()
        closed = {e["reservation"] for e in entries if e["event"] in (TRAIN, RELEASED) and e.get("reservation")}
        return [e for e in entries if (e["event"] == TRAIN or (e["event"] == RESERVED and link(e) not in closed))
                and (run is None or e.get("run", "") == run)]

    def history(self, run: str | None = None) -> History:
        return _history(self.spending(run))

    def _standing(self, run: str) -> tuple[History, History, tuple[float, float] | None]:
        """From one read of the ledger: what counts in all, what counts in `run`, and (sigma, q) of
        the last round whose sigma the site calibrated (kept while it still fits)."""
        counting = self.spending()
        calibrated = [e for e in counting if e.get("calibrated")]
        last = (calibrated[-1]["noise_multiplier"], calibrated[-1]["sample_rate"]) if calibrated else None
        return _history(counting), _history(e for e in counting if e.get("run", "") == run), last

    def spent(self) -> dict[str, Any]:
        counting = self.spending()
        entries = [e for e in counting if e["event"] == TRAIN]
        h, delta = _history(counting), self.budget.delta
        return {"epsilon": epsilon(h, delta, self.accountant), "epsilon_prv": epsilon_prv(h, delta),
                "epsilon_rdp": epsilon_rdp(h, delta), "delta": delta, "rounds": len(entries),
                "steps": sum(m.steps for m in h), "runs": len({e.get("run", "") for e in entries})}

    # -- before training --------------------------------------------------------
    def plan_round(self, server_round: int, sample_rate: float, steps: int, noise_multiplier: float = 0.0,
                   rounds_left: int = 1, run: str = "", anchor: str = "") -> RoundPlan:
        """This round's sigma and projected epsilon, its spend reserved in the ledger; raises
        BudgetExhausted (after recording the refusal) when the round would exceed the budget or
        the site's per-run share, and LedgerTampered when `anchor` (the coordinator's record of this
        site's last ledger head) is not in the ledger."""
        with self.ledger.transaction():
            if anchor and not self.ledger.contains(anchor):
                raise LedgerTampered(
                    f"site {self.site}: the coordinator's record of this site's last ledger entry "
                    f"({anchor[:12]}) is not in {self.ledger.path}: the ledger was rewritten, replaced or reset "
                    "since; restore it (a reset the consortium agrees to: the coordinator removes this site "
                    "from its privacy.ledger-heads file)")
            try:
                plan = self._decide(server_round, *self._standing(run), sample_rate, steps, noise_multiplier,
                                    rounds_left)
            except _Refusal as refusal:
                self._refuse(server_round, run, refusal)
            reserved = self.ledger.append({"event": RESERVED, "site": self.site, "run": run, **asdict(plan),
                                           "delta": self.budget.delta, "accountant": self.accountant,
                                           "time": _now()})
        return replace(plan, reservation=reserved["mac"])

    def forecast(self, sample_rate: float, steps: int, noise_multiplier: float, rounds: int,
                 run: str = "", anchor: str = "") -> Forecast:
        """What `rounds` more rounds of `run` would cost if the site trained in every one: the sigma it
        would use in the first, the run's epsilon, its total after, and the round it would refuse
        (round 1 when its ledger no longer holds `anchor`). Writes nothing."""
        spent, run_spent, last = self._standing(run)
        delta = self.budget.delta
        before = epsilon(spent, delta, self.accountant)
        calibrated = noise_multiplier <= 0
        first_sigma, trained, refuses_at, why = noise_multiplier, 0, 0, ""
        anchored = not anchor or self.ledger.contains(anchor)
        if not anchored:
            rounds, refuses_at, why = 0, 1, "its ledger does not hold the head it last reported"
        for r in range(1, rounds + 1):
            try:
                plan = self._decide(r, spent, run_spent, last, sample_rate, steps, noise_multiplier, rounds - r + 1)
            except _Refusal as refusal:
                refuses_at, why = r, refusal.why
                break
            if r == 1:
                first_sigma = plan.noise_multiplier
            last = (plan.noise_multiplier, sample_rate) if calibrated else last
            mechanism = (Mechanism(plan.noise_multiplier, sample_rate, steps),)
            spent, run_spent, trained = canonical(spent + mechanism), canonical(run_spent + mechanism), r
        return Forecast(self.budget.epsilon, delta, before, first_sigma, calibrated, trained,
                        epsilon(run_spent, delta, self.accountant), epsilon(spent, delta, self.accountant),
                        refuses_at, why, self.share, anchored)

    def _decide(self, server_round: int, spent: History, run_spent: History, last: tuple[float, float] | None,
                sample_rate: float, steps: int, noise_multiplier: float, rounds_left: int) -> RoundPlan:
        """The round's plan from what is spent (in all and in this run); raises _Refusal."""
        delta, target, share = self.budget.delta, self.budget.epsilon, self.share
        rounds_left = max(1, rounds_left)
        calibrated = noise_multiplier <= 0
        if calibrated:
            try:
                noise_multiplier = self._calibrate(spent, run_spent, sample_rate, steps, rounds_left, last)
            except CalibrationError as err:
                raise _Refusal(epsilon(spent, delta, self.accountant), str(err)) from None
        this = Mechanism(noise_multiplier, sample_rate, steps)
        after = spent + (this,)
        run_after = run_spent + (this,)
        run_projected = epsilon(run_spent + (Mechanism(noise_multiplier, sample_rate, steps * rounds_left),), delta,
                                self.accountant)
        plan = RoundPlan(server_round, noise_multiplier, sample_rate, steps, epsilon(after, delta, self.accountant),
                         epsilon_prv(after, delta), epsilon_rdp(after, delta), calibrated,
                         epsilon(run_after, delta, self.accountant), run_projected)
        if not plan.epsilon <= target:
            raise _Refusal(plan.epsilon, f"this round ({steps} steps, sigma {noise_multiplier:g}, q {sample_rate:.4g}) "
                                         f"would bring epsilon to {plan.epsilon:.3f}, past its budget")
        if share is not None and share.refuse and not run_projected <= share.epsilon:
            raise _Refusal(plan.epsilon, f"this run ({rounds_left} round(s) left at sigma {noise_multiplier:g}) would "
                                         f"spend epsilon {run_projected:.3f}, more than this site's per-run share "
                                         f"{share.epsilon:g} (node config {NODE_EPSILON_PER_RUN})", "per-run share")
        return plan

    def _calibrate(self, spent: History, run_spent: History, sample_rate: float, steps: int, rounds_left: int,
                   last: tuple[float, float] | None) -> float:
        """Sigma so that the rounds left, at this round's steps, just fit the budget and the per-run
        share (whether the site refuses or warns: a sigma it chooses never needs the warning). The last
        round's sigma is kept while it still fits, so a run's sigma is stable."""
        delta, n, binding = self.budget.delta, steps * rounds_left, self.share

        def fits(sigma: float) -> bool:
            more = (Mechanism(sigma, sample_rate, n),)
            return (epsilon(spent + more, delta, self.accountant) <= self.budget.epsilon
                    and (binding is None or epsilon(run_spent + more, delta, self.accountant) <= binding.epsilon))

        if last and last[1] == sample_rate and fits(last[0]):
            return last[0]
        sigma = calibrate_noise(self.budget.epsilon, delta, sample_rate, n, spent, self.accountant)
        if binding is not None:
            sigma = max(sigma, calibrate_noise(binding.epsilon, delta, sample_rate, n, run_spent, self.accountant))
        return sigma

    def _refuse(self, server_round: int, run: str, refusal: _Refusal) -> None:
        projected = refusal.projected
        self.ledger.append({"event": REFUSED, "site": self.site, "run": run, "round": server_round,
                            "projected_epsilon": projected if math.isfinite(projected) else None,
                            "budget_epsilon": self.budget.epsilon, "delta": self.budget.delta,
                            "reason": refusal.why, "time": _now()})
        raise BudgetExhausted(
            f"site {self.site} refuses round {server_round}: {refusal.why} (its privacy budget: epsilon "
            f"{self.budget.epsilon:g}, delta {self.budget.delta:g}, {self.accountant})",
            f"site {self.site} refuses round {server_round}: its {refusal.limit} would be exceeded")

    # -- after training, before the update leaves ------------------------------
    def release(self, plan: RoundPlan, why: str) -> None:
        """Give back a reservation whose training failed before anything left the site."""
        self.ledger.append({"event": RELEASED, "site": self.site, "round": plan.round,
                            "reservation": plan.reservation, "reason": why, "time": _now()})

    def commit(self, plan: RoundPlan, run: str = "", **details: Any) -> dict[str, Any]:
        """Append the round to the ledger (durably), closing its reservation, and return the entry."""
        return self.ledger.append({
            "event": TRAIN, "site": self.site, "run": run, "unit": self.unit,
            **asdict(plan),
            "delta": self.budget.delta, "accountant": self.accountant,
            "budget_epsilon": self.budget.epsilon, "budget_source": self.budget.source,
            **details, "versions": library_versions(), "time": _now(),
        })


def _history(entries) -> History:
    return canonical(Mechanism(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries)


def coarse_epsilon(value: float) -> float:
    """An epsilon as a site reports it under secure aggregation: rounded up to a tenth, so that,
    with a sigma the run fixes, it does not pin down the site's sampling rate (its unit count)."""
    return math.ceil(value * 10 - 1e-9) / 10 if math.isfinite(value) else value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
