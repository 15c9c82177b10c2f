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
from fedlora.privacy.budget import Budget
from fedlora.privacy.ledger import Ledger, LedgerTampered
from fedlora.versions import library_versions

TRAIN = "train"
RESERVED = "reserved"   # a planned round's spend, held from the check until its commit or release
RELEASED = "released"   # a reservation whose training failed before anything left the site
REFUSED = "refused"


class BudgetExhausted(RuntimeError):
    """This round would take the site past its privacy budget; the site does not train."""


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
    reservation: str = ""     # the ledger entry that holds this round's spend until it is committed


class SiteAccountant:
    def __init__(self, directory: str | Path, budget: Budget, accountant: str = "prv",
                 site: str = "site", unit: str = "record"):
        self.ledger = Ledger(directory)
        self.budget = budget
        self.accountant = accountant
        self.site = site
        self.unit = unit

    # -- what has been spent ----------------------------------------------------
    def spending(self) -> list[dict[str, Any]]:
        """The ledger entries that count: every committed round and every open reservation."""
        entries = self.ledger.entries()
        closed = {e["reservation"] for e in entries if e["event"] in (TRAIN, RELEASED) and e.get("reservation")}
        return [e for e in entries if e["event"] == TRAIN or (e["event"] == RESERVED and e["mac"] not in closed)]

    def history(self) -> History:
        return canonical(Mechanism(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.spending())

    def spent(self) -> dict[str, Any]:
        entries = [e for e in self.spending() if e["event"] == TRAIN]
        h, delta = self.history(), self.budget.delta
        return {"epsilon": epsilon(h, delta, self.accountant), "epsilon_prv": epsilon_prv(h, delta),
                "epsilon_rdp": epsilon_rdp(h, delta), "delta": delta, "rounds": len(entries),
                "steps": sum(m.steps for m in h)}

    # -- before training --------------------------------------------------------
    def plan_round(self, server_round: int, sample_rate: float, steps: int, noise_multiplier: float = 0.0,
                   rounds_left: int = 1, run: str = "", anchor: str = "") -> RoundPlan:
        """This round's sigma and projected epsilon, its spend reserved in the ledger; raises
        BudgetExhausted (after recording the refusal) when the round would exceed the budget, and
        LedgerTampered when `anchor` (the coordinator's record of this site's last ledger head) is not
        in the ledger."""
        with self.ledger.transaction():
            if anchor and not self.ledger.contains(anchor):
                raise LedgerTampered(
                    f"site {self.site}: the coordinator's record of this site's last ledger entry "
                    f"({anchor[:12]}) is not in {self.ledger.path}: the ledger was rewritten, replaced or reset "
                    "since; restore it (a reset the consortium agrees to: the coordinator removes this site "
                    "from its privacy.ledger-heads file)")
            plan = self._plan(server_round, sample_rate, steps, noise_multiplier, rounds_left, run)
            reserved = self.ledger.append({"event": RESERVED, "site": self.site, "run": run, **asdict(plan),
                                           "delta": self.budget.delta, "accountant": self.accountant,
                                           "time": _now()})
        return replace(plan, reservation=reserved["mac"])

    def _plan(self, server_round: int, sample_rate: float, steps: int, noise_multiplier: float,
              rounds_left: int, run: str) -> RoundPlan:
        spent = self.history()
        delta, target = self.budget.delta, self.budget.epsilon
        calibrated = noise_multiplier <= 0
        if calibrated:
            try:
                noise_multiplier = self._calibrate(spent, sample_rate, steps, max(1, rounds_left))
            except CalibrationError as err:
                self._refuse(server_round, run, epsilon(spent, delta, self.accountant), str(err))
        after = spent + (Mechanism(noise_multiplier, sample_rate, steps),)
        plan = RoundPlan(server_round, noise_multiplier, sample_rate, steps, epsilon(after, delta, self.accountant),
                         epsilon_prv(after, delta), epsilon_rdp(after, delta), calibrated)
        if not plan.epsilon <= target:
            self._refuse(server_round, run, plan.epsilon,
                         f"this round ({steps} steps, sigma {noise_multiplier:g}, q {sample_rate:.4g}) "
                         f"would bring epsilon to {plan.epsilon:.3f}")
        return plan

    def _calibrate(self, spent: History, sample_rate: float, steps: int, rounds_left: int) -> float:
        """Sigma so that the rounds left, at this round's steps, just fit the budget.
        The last round's sigma is kept while it still fits, so a run's sigma is stable."""
        delta, target = self.budget.delta, self.budget.epsilon
        last = [e for e in self.spending() if e.get("calibrated")]
        if last and last[-1]["sample_rate"] == sample_rate:
            sigma = last[-1]["noise_multiplier"]
            if epsilon(spent + (Mechanism(sigma, sample_rate, steps * rounds_left),), delta,
                       self.accountant) <= target:
                return sigma
        return calibrate_noise(target, delta, sample_rate, steps * rounds_left, spent, self.accountant)

    def _refuse(self, server_round: int, run: str, projected: float, why: str) -> None:
        self.ledger.append({"event": REFUSED, "site": self.site, "run": run, "round": server_round,
                            "projected_epsilon": projected if math.isfinite(projected) else None,
                            "budget_epsilon": self.budget.epsilon, "delta": self.budget.delta,
                            "reason": why, "time": _now()})
        raise BudgetExhausted(
            f"site {self.site} refuses round {server_round}: privacy budget epsilon {self.budget.epsilon:g} "
            f"(delta {self.budget.delta:g}, {self.accountant}) would be exceeded: {why}")

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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
