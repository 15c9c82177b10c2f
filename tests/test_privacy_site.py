"""A site's budget: stricter node budget wins, the budget stop, spend that survives
a restart (a new process reading the same disk), and a tamper-evident ledger."""

import json
import subprocess
import sys

import pytest

from fedlora.privacy.accounting import epsilon_by_round
from fedlora.privacy.budget import Budget, PrivacyStateError, dp_required, resolve_budget, state_dir, unit_column
from fedlora.privacy.ledger import Ledger, LedgerTampered
from fedlora.privacy.site import BudgetExhausted, SiteAccountant

DELTA = 1e-5
Q, STEPS, SIGMA = 0.25, 8, 1.5


def _run_until_refusal(accountant: SiteAccountant, rounds: int = 10, start: int = 1) -> int:
    """Plan and commit rounds like the site does; return the round refused."""
    for r in range(start, rounds + 1):
        try:
            plan = accountant.plan_round(r, Q, STEPS, SIGMA, run="test")
        except BudgetExhausted:
            return r
        accountant.commit(plan, run="test")
    return 0


def test_the_stricter_budget_wins():
    assert resolve_budget(8.0, 1e-5, {}) == Budget(8.0, 1e-5, "epsilon: run config, delta: run config")
    strict = resolve_budget(8.0, 1e-5, {"privacy-epsilon": 2.0, "privacy-delta": "1e-6"})
    assert (strict.epsilon, strict.delta) == (2.0, 1e-6) and strict.source.count("node config") == 2
    loose = resolve_budget(3.0, 1e-5, {"privacy-epsilon": 10.0, "privacy-delta": 1e-3})
    assert (loose.epsilon, loose.delta) == (3.0, 1e-5)  # a node cannot be talked into more
    with pytest.raises(ValueError, match="privacy-epsilon"):
        resolve_budget(3.0, 1e-5, {"privacy-epsilon": "lots"})


def test_a_site_can_make_dp_mandatory_and_choose_its_unit(tmp_path):
    assert not dp_required(False, {"partition-id": 0})
    assert dp_required(False, {"privacy-epsilon": 3})
    assert unit_column("", {"privacy-unit-column": "patient-id"}) == "patient-id"
    assert state_dir({}, str(tmp_path), "site-1", simulated=True) == tmp_path / "sites" / "site-1"
    assert state_dir({"state-dir": "/srv/fl"}, str(tmp_path), "a", simulated=False).as_posix() == "/srv/fl"
    with pytest.raises(PrivacyStateError, match="state-dir"):  # fail closed: nowhere to keep the budget
        state_dir({"data-path": "x.jsonl"}, "", "a", simulated=False)


def test_budget_stop_refuses_at_the_right_round(tmp_path):
    target = 3.0
    by_round = epsilon_by_round(SIGMA, Q, STEPS, 10, DELTA, "prv")
    expected = next(r for r, e in enumerate(by_round, start=1) if e > target)
    assert 1 < expected <= 10
    accountant = SiteAccountant(tmp_path, Budget(target, DELTA, "test"), "prv", "site-a")
    assert _run_until_refusal(accountant) == expected
    entries = Ledger(tmp_path).entries()
    assert [e["event"] for e in entries] == ["reserved", "train"] * (expected - 1) + ["refused"]
    assert all(t["reservation"] == r["mac"] for r, t in zip(entries[0:-1:2], entries[1:-1:2]))
    assert entries[-2]["epsilon"] <= target < entries[-1]["projected_epsilon"]
    assert entries[-2]["epsilon"] == pytest.approx(by_round[expected - 2])


def test_a_restarted_site_keeps_its_spent_budget(tmp_path):
    budget = Budget(5.5, DELTA, "test")  # refused at round 5
    first = SiteAccountant(tmp_path, budget, "prv", "site-a")
    for r in (1, 2):
        first.commit(first.plan_round(r, Q, STEPS, SIGMA), run="test")
    spent = first.spent()
    # A new process reading the same disk sees the same spend...
    code = ("import json, sys; from fedlora.privacy.site import SiteAccountant; "
            "from fedlora.privacy.budget import Budget; "
            f"a = SiteAccountant(sys.argv[1], Budget(5.5, {DELTA}, 't'), 'prv'); print(json.dumps(a.spent()))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == pytest.approx(spent)
    # ...and a new object refuses at the same round a never-restarted site would.
    fresh = tmp_path / "never-restarted"
    assert _run_until_refusal(SiteAccountant(tmp_path, budget, "prv"), start=3) == \
        _run_until_refusal(SiteAccountant(fresh, budget, "prv")) == 5


def test_calibrated_sigma_spends_the_budget_over_the_planned_rounds(tmp_path):
    accountant = SiteAccountant(tmp_path, Budget(2.0, DELTA, "test"), "rdp")
    sigmas = []
    for r in range(1, 5):
        plan = accountant.plan_round(r, Q, STEPS, 0.0, rounds_left=5 - r)
        accountant.commit(plan)
        sigmas.append(plan.noise_multiplier)
    assert len(set(sigmas)) == 1  # stable across rounds
    assert 0.95 * 2.0 < accountant.spent()["epsilon"] <= 2.0


def _ledger_with(tmp_path, n: int) -> Ledger:
    ledger = Ledger(tmp_path)
    for r in range(n):
        ledger.append({"event": "train", "round": r + 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5})
    return ledger


def test_ledger_detects_an_edited_entry(tmp_path):
    ledger = _ledger_with(tmp_path, 3)
    lines = ledger.path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["noise_multiplier"] = 5.0  # claim more noise than was used
    lines[1] = json.dumps(entry, sort_keys=True)
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerTampered, match="mac mismatch"):
        ledger.entries()


def test_ledger_detects_removed_entries(tmp_path):
    ledger = _ledger_with(tmp_path, 3)
    lines = ledger.path.read_text().splitlines()
    ledger.path.write_text(lines[0] + "\n" + lines[2] + "\n")  # drop the middle round
    with pytest.raises(LedgerTampered, match="chain"):
        ledger.entries()
    ledger.path.write_text("\n".join(lines[:2]) + "\n")  # drop the last round: the head knows
    with pytest.raises(LedgerTampered, match="removed"):
        ledger.entries()
    ledger.path.unlink()
    with pytest.raises(LedgerTampered, match="missing"):
        ledger.entries()


def test_tampered_ledger_stops_the_site(tmp_path):
    accountant = SiteAccountant(tmp_path, Budget(8.0, DELTA, "test"), "rdp")
    accountant.commit(accountant.plan_round(1, Q, STEPS, SIGMA))
    head = json.loads(accountant.ledger.head_path.read_text())
    accountant.ledger.head_path.write_text(json.dumps({**head, "last": "0" * 64}))
    with pytest.raises(LedgerTampered):
        accountant.plan_round(2, Q, STEPS, SIGMA)


def test_ledger_survives_a_crash_between_entry_and_head(tmp_path):
    ledger = _ledger_with(tmp_path, 2)
    head = ledger.head_path.read_text()
    ledger.append({"event": "train", "round": 3, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5})
    ledger.head_path.write_text(head)  # as if the process died before updating the head
    assert len(ledger.entries()) == 3  # the extra, valid entry only adds spend: kept
    ledger.append({"event": "train", "round": 4, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5})
    assert json.loads(ledger.head_path.read_text())["count"] == 4  # and the next append writes the head


CONCURRENT_ROUND = """
import sys, time
from fedlora.privacy.budget import Budget
from fedlora.privacy.site import BudgetExhausted, SiteAccountant
accountant = SiteAccountant(sys.argv[1], Budget(float(sys.argv[2]), 1e-5, "test"), "prv", "site-a")
while time.time() < float(sys.argv[3]):  # both processes start their check together
    time.sleep(0.001)
try:
    plan = accountant.plan_round(1, 0.25, 8, 1.5, run=sys.argv[4])
except BudgetExhausted:
    print("refused")
    sys.exit(0)
time.sleep(1.0)  # training
accountant.commit(plan, run=sys.argv[4])
print("trained")
"""


def test_two_trainings_at_one_site_cannot_both_pass_a_check_only_one_fits(tmp_path):
    """Two processes (two runs) at one site, a budget that fits one round: before the check and the
    reservation were one transaction, both trained and the site reached 1.3x its budget."""
    one, two = epsilon_by_round(SIGMA, Q, STEPS, 2, DELTA, "prv")
    budget = (one + two) / 2  # one round fits, two do not
    start = __import__("time").time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_ROUND, str(tmp_path), str(budget), str(start),
                               f"run-{i}"], stdout=subprocess.PIPE, text=True) for i in range(2)]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outcomes == ["refused", "trained"]
    accountant = SiteAccountant(tmp_path, Budget(budget, DELTA, "test"), "prv", "site-a")
    assert accountant.spent()["epsilon"] == pytest.approx(one, rel=1e-6) and one <= budget


def test_a_reservation_counts_until_committed_and_a_failed_training_gives_it_back(tmp_path):
    one, _ = epsilon_by_round(SIGMA, Q, STEPS, 2, DELTA, "prv")
    accountant = SiteAccountant(tmp_path, Budget(8.0, DELTA, "test"), "prv", "site-a")
    plan = accountant.plan_round(1, Q, STEPS, SIGMA)
    assert accountant.spent()["epsilon"] == pytest.approx(one, rel=1e-6)  # reserved = spent (a crash keeps it)
    accountant.release(plan, "training failed")
    assert accountant.spent()["epsilon"] == 0.0
    accountant.commit(accountant.plan_round(1, Q, STEPS, SIGMA))
    assert accountant.spent()["epsilon"] == pytest.approx(one, rel=1e-6) and accountant.spent()["rounds"] == 1
