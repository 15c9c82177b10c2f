"""Every aggregation strategy on simulated federations, one federated run each.

Scenarios:
  default        every strategy on the default scenario (4 hospitals); Krum and
                 multi-krum with f = 0, the most four sites allow.
  heterogeneous  the strategies that take mixed ranks, with site ranks 8, 4, 4, 2.
  poisoned       5 hospitals, site 0 ATTACKS (simulation.attack): it scales its update
                 by 10 (scale-update), or trains on flipped labels (flip-labels); FedIT
                 against the robust strategies, and FedIT without attack.

Full mode: `fedlora simulate` (Ray) at the `fedlora simulate` defaults (all-MiniLM-L6-v2,
5 rounds), both attacks; about 2 hours on 2 cores, so `fedlora bench` runs it only when
named (`--only strategies`). Quick mode: the same cases on tiny-bert, 2 short rounds,
in-process (a smoke test of every strategy and attack; its accuracies are chance).

Each run lands in <workdir>/strategies/<scenario>/<case>/ (a normal run directory;
a finished one is reused, so an interrupted comparison continues). Reported per
case: the final central test and site evaluation scores, bytes per round, and the
largest `aggregation_error` over the rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from fedlora import config as cfg
from fedlora.bench.engines import finished_run
from fedlora.bench.suite import BenchContext, SuiteResult, markdown_table
from fedlora.server.rundir import RunDirectory
from fedlora.simulations.launcher import SimulationFailed
from fedlora.strategies import STRATEGIES

NAME = "strategies"
TITLE = "Aggregation strategies: default scenario, heterogeneous ranks, a poisoned site"

SCENARIOS = ("default", "heterogeneous", "poisoned")
MIXED_RANKS = "8,4,4,2"
POISON_SITES = ("federation.num-sites=5", "federation.min-sites=5")
ROBUST = (
    ("fedit", ("strategy.name=fedit",)),
    ("fedit + norm bound (2× median)", ("strategy.name=fedit", "strategy.norm-bound-relative=2")),
    ("median", ("strategy.name=median",)),
    ("trimmed-mean", ("strategy.name=trimmed-mean",)),
    ("krum", ("strategy.name=krum",)),
    ("multi-krum", ("strategy.name=multi-krum",)),
)
CAPTIONS = {"default": "Default scenario",
            "heterogeneous": f"Heterogeneous ranks (site ranks {MIXED_RANKS})",
            "poisoned": "Poisoned site (5 hospitals; site 0 scales its update by 10×, or trains on flipped labels)"}


@dataclass(frozen=True)
class Plan:
    sets: tuple[str, ...]       # settings of every run
    attacks: tuple[str, ...]    # the poisoned scenario's
    engine: str                 # fedlora.bench.engines.ENGINES: simulate or in-process


QUICK = Plan(sets=("model.name=tiny-bert", "model.max-length=32", "federation.rounds=2", "data.records-per-site=40",
                   "train.local-steps=2"), attacks=("scale-update", "flip-labels"), engine="in-process")
FULL = Plan(sets=(), attacks=("scale-update", "flip-labels"), engine="simulate")


@dataclass(frozen=True)
class Case:
    scenario: str
    label: str
    sets: tuple[str, ...]

    @property
    def strategy(self) -> str:
        return next(s.split("=", 1)[1] for s in reversed(self.sets) if s.startswith("strategy.name="))

    @property
    def folder(self) -> str:
        return "".join(c if c.isalnum() or c in "-." else "_" for c in self.label)


def four_site_krum(name: str) -> tuple[str, ...]:
    """Krum and multi-krum with f = 0, the most four sites allow."""
    return (f"strategy.{name}.byzantine=0", "federation.min-sites=3")


def cases(attacks: tuple[str, ...]) -> list[Case]:
    """Every case of the three scenarios, in SCENARIOS order."""
    out: list[Case] = []
    for name in STRATEGIES:
        extra = four_site_krum(name) if "krum" in name else ()
        out.append(Case("default", name, (f"strategy.name={name}", *extra)))
    for name, cls in STRATEGIES.items():
        if cls.heterogeneous_ranks and name in ("fedit", "ffa", "flora", "fedex", "fedsa"):
            out.append(Case("heterogeneous", f"{name} ranks {MIXED_RANKS}",
                            (f"strategy.name={name}", f"simulation.site-ranks={MIXED_RANKS}")))
    out.append(Case("poisoned", "fedit, no attack", (*POISON_SITES, "strategy.name=fedit")))
    for attack in attacks:
        sets = (*POISON_SITES, f"simulation.attack={attack}", "simulation.attack-sites=0",
                "simulation.attack-scale=10")
        out += [Case("poisoned", f"{label}, {attack}", (*sets, *extra)) for label, extra in ROBUST]
    return out


def summarize(rundir: Path) -> dict:
    """Final figures of a run directory, bytes per round and the worst aggregation error."""
    rows = RunDirectory(rundir).read_metrics()
    last = rows[-1]
    errors = [r["aggregation_error"] for r in rows if r.get("aggregation_error") is not None]
    keys = ("test_accuracy", "test_macro_f1", "eval_accuracy", "eval_macro_f1")
    return {
        **{k: last.get(k) for k in keys},
        "bytes_up_per_round": mean(r["bytes_up"] for r in rows),
        "bytes_down_per_round": mean(r["bytes_down"] for r in rows),
        "aggregation_error_max": max(errors) if errors else None,
        "rounds": len(rows),
        "seconds": sum(r["round_seconds"] for r in rows),
    }


def run_case(case: Case, plan: Plan, folder: Path) -> dict:
    """One case's figures; a case the engine or the configuration refuses is reported, not raised."""
    row = {"scenario": case.scenario, "case": case.label, "strategy": case.strategy, "sets": list(case.sets)}
    try:
        rundir = finished_run(plan.engine, [*plan.sets, *case.sets], folder / case.scenario / case.folder)
    except (SimulationFailed, cfg.ConfigError) as err:
        return {**row, "error": str(err)}
    return {**row, **summarize(rundir)}


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render(results: list[dict], plan_sets: list[str], engine: str) -> str:
    how = "`fedlora simulate` (Ray)" if engine == "simulate" else "in-process (sites in turn)"
    sets = ", ".join(f"`{s}`" for s in plan_sets) or "the `fedlora simulate` defaults"
    lines = [f"One run per case, {how}, {sets}. Bytes: every message of a round, all sites, train and evaluate "
             "together; aggregation_error: its largest value over the rounds.", ""]
    for scenario in SCENARIOS:
        rows = [r for r in results if r["scenario"] == scenario]
        done = [r for r in rows if "error" not in r]
        if not rows:
            continue
        lines += [f"#### {CAPTIONS[scenario]}", "",
                  markdown_table(["case", "test acc", "test macro-F1", "site eval acc", "bytes up / round",
                                  "bytes down / round", "max aggregation_error"],
                                 [[r["case"], r["test_accuracy"], r["test_macro_f1"], r["eval_accuracy"],
                                   f"{r['bytes_up_per_round']:,.0f}", f"{r['bytes_down_per_round']:,.0f}",
                                   _fmt(r["aggregation_error_max"], ".2e")] for r in done]), ""]
        lines += [f"Failed: {r['case']}: {r['error'].splitlines()[0]}" for r in rows if "error" in r]
    return "\n".join(lines).rstrip()


def run(ctx: BenchContext) -> SuiteResult:
    plan = QUICK if ctx.quick else FULL
    folder = ctx.folder(NAME)
    results = [run_case(case, plan, folder)
               for case in ctx.progress(cases(plan.attacks), "strategies: cases")]
    failed = [r for r in results if "error" in r]
    notes = [f"strategies: {len(failed)} of {len(results)} cases failed; their errors are in the figures."] \
        if failed else []
    if ctx.quick:
        notes.append("strategies: quick mode trains tiny-bert (random weights) for 2 short rounds: a smoke test "
                     "of every case, not a comparison of the strategies.")
    figures = {"engine": plan.engine, "sets": list(plan.sets), "attacks": list(plan.attacks), "results": results}
    return SuiteResult(figures, render(results, list(plan.sets), plan.engine), notes)
