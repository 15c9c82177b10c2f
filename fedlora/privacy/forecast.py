"""The pre-run privacy forecast: before round one the coordinator asks every site what
the run will cost it, and shows the answers before anything is spent.

Each site computes its own answer from its own ledger, budget and data (a QUERY
message; the site writes nothing): under DP-SGD, the sigma it would use, the
epsilon of this run alone, its total after the run, its per-run share, and the
round it would refuse; under distributed DP, the same for its site-level
distributed-DP budget. The answer assumes the site trains in every round of the
run (an upper bound when federation.fraction-train < 1). Under secure
aggregation sigma is left out and epsilons are rounded up to a tenth (exact
figures would give the site's record count away), as in its train replies.

The coordinator logs a table, warns for every site that would refuse a round
or pass its per-run share, and writes the answers to summary.json
(`privacy.forecast`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

from fedlora.privacy.site import Forecast, coarse_epsilon

log = logging.getLogger(__name__)

RECORD = "forecast"   # the MetricRecord of a site's reply to the forecast query
LOW_REMAINDER = 0.1   # warn when a run would leave less than this share of a site's budget


def pack(dp_sgd: Forecast | None, distributed: Mapping[str, float] | None, secure: bool) -> dict[str, float]:
    """A site's answer, as MetricRecord values; `secure`: the run uses secure aggregation, so sigma is
    left out and epsilons are rounded up to a tenth."""
    out: dict[str, float] = {"dp-sgd": 1.0 if dp_sgd else 0.0, "distributed": 1.0 if distributed else 0.0}
    if dp_sgd is not None:
        shown = coarse_epsilon if secure else float  # under secure aggregation as in its train replies
        out.update({"budget-epsilon": dp_sgd.budget_epsilon, "delta": dp_sgd.delta,
                    "spent-epsilon": shown(dp_sgd.spent_epsilon), "run-epsilon": shown(dp_sgd.run_epsilon),
                    "after-epsilon": shown(dp_sgd.after_epsilon), "rounds": float(dp_sgd.rounds),
                    "refuses-at": float(dp_sgd.refuses_at), "ledger-mismatch": 0.0 if dp_sgd.anchored else 1.0,
                    "share-epsilon": dp_sgd.share.epsilon if dp_sgd.share else 0.0,
                    "share-refuses": 1.0 if dp_sgd.share and dp_sgd.share.refuse else 0.0})
        if not secure:
            out["noise-multiplier"] = dp_sgd.noise_multiplier
    if distributed is not None:
        out.update({f"ddp-{key.replace('_', '-')}": float(value) for key, value in distributed.items()})
    return {k: (v if math.isfinite(v) else -1.0) for k, v in out.items()}  # -1: unbounded


def _eps(value: float | None) -> str:
    return "-" if value is None else ("unbounded" if value < 0 else f"{value:.3f}")


def _left(a: Mapping[str, float], prefix: str) -> str:
    after = a[f"{prefix}after-epsilon"]
    return "-" if after < 0 else f"{max(0.0, a[f'{prefix}budget-epsilon'] - after):.3f}"


def table(answers: Mapping[str, Mapping[str, float]]) -> str:
    """The coordinator's view: one line per site that spends privacy budget in this run."""
    lines = ["privacy forecast for this run (each site's own accounting; assumes it trains every round):",
             f"  {'site':<20} {'budget':>8} {'spent':>8} {'this run':>9} {'after':>8} {'left':>8} {'share':>8} "
             f"{'sigma':>7}  refuses at"]
    for site, a in sorted(answers.items()):
        if a.get("dp-sgd"):
            share = f"{a['share-epsilon']:g}" if a.get("share-epsilon") else "-"
            sigma = f"{a['noise-multiplier']:.3g}" if "noise-multiplier" in a else "hidden"
            refuses = f"round {int(a['refuses-at'])}" if a.get("refuses-at") else "-"
            lines.append(f"  {site:<20} {a['budget-epsilon']:>8g} {_eps(a['spent-epsilon']):>8} "
                         f"{_eps(a['run-epsilon']):>9} {_eps(a['after-epsilon']):>8} {_left(a, ''):>8} {share:>8} "
                         f"{sigma:>7}  {refuses}")
        if a.get("distributed"):
            refuses = f"round {int(a['ddp-refuses-at'])}" if a.get("ddp-refuses-at") else "-"
            lines.append(f"  {site + ' (distrib.)':<20} {a['ddp-budget-epsilon']:>8g} {_eps(a['ddp-spent-epsilon']):>8} "
                         f"{'':>9} {_eps(a['ddp-after-epsilon']):>8} {_left(a, 'ddp-'):>8} {'-':>8} {'':>7}  {refuses}")
    return "\n".join(lines)


def warnings(answers: Mapping[str, Mapping[str, float]]) -> list[str]:
    """One line per site that would refuse a round of this run or spend more than its per-run share,
    and one for the sites this run would leave with almost nothing for later runs."""
    out, low = [], []
    for site, a in sorted(answers.items()):
        if a.get("ledger-mismatch"):
            out.append(f"site {site}: its privacy ledger does not hold the head it last reported (rewritten, "
                       "replaced or reset): it will refuse to train; see docs/privacy.md, the ledger")
        elif a.get("refuses-at"):
            out.append(f"site {site} would refuse round {int(a['refuses-at'])} of this run (DP-SGD budget "
                       f"epsilon {a['budget-epsilon']:g}, {_eps(a['spent-epsilon'])} spent before the run)")
        elif a.get("share-epsilon") and a["run-epsilon"] > a["share-epsilon"]:
            out.append(f"site {site}: this run would spend epsilon {_eps(a['run-epsilon'])}, more than its per-run "
                       f"share {a['share-epsilon']:g} (it trains anyway and warns: privacy-per-run = warn)")
        elif a.get("dp-sgd") and a["run-epsilon"] > 0 and 0 <= a["after-epsilon"] and (
                a["budget-epsilon"] - a["after-epsilon"] < LOW_REMAINDER * a["budget-epsilon"]):
            low.append(f"{site} ({_left(a, '')} of {a['budget-epsilon']:g})")
        if a.get("ddp-refuses-at"):
            out.append(f"site {site} would refuse round {int(a['ddp-refuses-at'])} of this run (distributed-DP "
                       f"budget epsilon {a['ddp-budget-epsilon']:g})")
    if low:
        out.append(f"this run would leave {len(low)} site(s) less than {LOW_REMAINDER:.0%} of their budget for "
                   f"every later run: {', '.join(low)}; a site's privacy-epsilon-per-run caps what one run spends")
    return out


def report(answers: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Log the forecast at the coordinator; return it for summary.json."""
    spending = {site: dict(a) for site, a in answers.items() if a.get("dp-sgd") or a.get("distributed")}
    if spending:
        log.info("%s", table(spending))
    for line in warnings(spending):
        log.warning("privacy forecast: %s", line)
    return spending
