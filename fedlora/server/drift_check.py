"""The coordinator's view of drift at the sites: each site's answer to the drift query
(fedlora.client.drift), and whether retraining is due.

A site answers only if its node config says share-drift = true; its figures are aggregate and rounded
(label-mix PSI and chi-square p-value, Jensen-Shannon divergence of its words, the share of words it
never trained on, days since its last training) with its own verdict by its thresholds. Retraining is
due at the coordinator when any site says so, or when any site's last training is older than the
consortium's schedule (federation.retrain-after-days). The coordinator never sees a word or a row.
"""

from __future__ import annotations

from typing import Any

from fedlora import wire
from fedlora.data import drift

DRIFT_FILE = "drift.json"  # in a run directory: the sites' answers and the verdict

FIGURES = {wire.DRIFT_LABEL_PSI: "label_psi", wire.DRIFT_LABEL_CHI2_P: "label_chi2_p", wire.DRIFT_TEXT_JS: "text_js",
           wire.DRIFT_UNSEEN_WORDS: "unseen_word_share", wire.DRIFT_DAYS: "days_since_training"}


FAILED = {"shared": None, "failed": True}  # a site that did not answer (offline, or its check failed)


def site_answer(metrics: dict[str, float] | None, digest: str | None) -> dict[str, Any]:
    """One site's answer as the run directory keeps it; None: the site does not share drift figures."""
    if metrics is None:
        return {"shared": False}
    if not metrics.get(wire.DRIFT_HAS_SNAPSHOT):
        return {"shared": True, "trained": False}
    out: dict[str, Any] = {"shared": True, "trained": True, "site_says_due": bool(metrics.get(wire.DRIFT_DUE))}
    for key, name in FIGURES.items():
        value = metrics.get(key)
        out[name] = None if value is None or value < 0 else value  # -1: not measured (no labelled rows)
    if digest:
        out["snapshot"] = digest
    return out


def assess(answers: dict[str, dict[str, Any]], retrain_after_days: float) -> dict[str, Any]:
    """The drift check's report: each site's answer with whether retraining is due there and why."""
    sites = {}
    for site, answer in sorted(answers.items()):
        reasons = []
        if answer.get("site_says_due"):
            reasons.append("its own thresholds say so")
        days = answer.get("days_since_training")
        if days is not None and retrain_after_days > 0 and days >= retrain_after_days:
            reasons.append(f"its last training was {days:.0f} days ago (schedule: every {retrain_after_days:.0f})")
        sites[site] = {**answer, "due": bool(reasons), "why": reasons}
    due = [site for site, s in sites.items() if s["due"]]
    failed = [site for site, s in sites.items() if s.get("failed")]
    return {"retraining_due": bool(due), "due_at": due, "not_checked": failed,
            "retrain_after_days": retrain_after_days, "sites": sites}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def site_state(answer: dict[str, Any]) -> str:
    """What a site's answer lets a report say: "failed" (no answer), "not shared", "not trained" (nothing
    to compare with) or "checked" (its figures)."""
    if answer.get("failed"):
        return "failed"
    if not answer.get("shared"):
        return "not shared"
    return "checked" if answer.get("trained") else "not trained"


UNCHECKED_LINES = {"failed": "did not answer (offline, or its check failed: see the site's log)",
                   "not shared": "does not share drift figures (node config share-drift)",
                   "not trained": "has not trained yet: nothing to compare with"}


def lines(report: dict[str, Any]) -> list[str]:
    """The report for a terminal: one line per site, then the verdict."""
    out = [f"{'site':<24} {'label PSI':>9} {'chi2 p':>8} {'words JS':>9} {'new words':>10} {'days':>6}  due"]
    for site, s in report["sites"].items():
        if (state := site_state(s)) != "checked":
            out.append(f"{site:<24} {UNCHECKED_LINES[state]}")
        else:
            out.append(f"{site:<24} {_fmt(s['label_psi']):>9} {_fmt(s['label_chi2_p']):>8} {_fmt(s['text_js']):>9} "
                       f"{_fmt(s['unseen_word_share']):>10} {_fmt(s['days_since_training']):>6}  "
                       f"{'yes: ' + '; '.join(s['why']) if s['due'] else 'no'}")
    out.append(f"retraining due: {'yes, at ' + ', '.join(report['due_at']) if report['retraining_due'] else 'no'}"
               + (f"; not checked: {', '.join(report['not_checked'])}" if report.get("not_checked") else ""))
    return out


def exit_code(report: dict[str, Any]) -> int:
    """For cron and systemd timers: 3 when retraining is due, 1 when a site could not be checked, else 0."""
    if report["retraining_due"]:
        return drift.DUE_EXIT
    return 1 if report.get("not_checked") else 0
