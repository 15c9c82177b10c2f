"""Compare the aggregation strategies on simulated federations, one `fedlora simulate` run each.

Scenarios:
  default        every strategy on the default scenario (`fedlora simulate` defaults:
                 4 hospitals, all-MiniLM-L6-v2); Krum variants with f = 0, the most
                 four sites allow.
  heterogeneous  the strategies that take mixed ranks, with site ranks 8, 4, 4, 2.
  poisoned       5 hospitals, site 0 ATTACKS (simulation.attack): it scales its update
                 by 10 (scale-update) and/or trains on flipped labels (flip-labels, with
                 --attacks); FedIT against the robust strategies, and FedIT without attack.

    python -m fedlora.simulations.compare_strategies --out runs/strategies \\
        [--scenario default,heterogeneous,poisoned] [--attacks scale-update,flip-labels]
        [--only fedit,median] [--set key=value ...]

Each run lands in OUT/<scenario>/<case>/ (a normal run directory; an existing
finished one is reused, so an interrupted comparison can be continued). The
table goes to stdout and OUT/results.md, the figures to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from fedlora import config as cfg
from fedlora.server.rundir import RunDirectory
from fedlora.simulations.launcher import SimulationFailed, simulate
from fedlora.strategies import STRATEGIES

SCENARIOS = ("default", "heterogeneous", "poisoned")
FOUR_SITE_KRUM = ("strategy.byzantine=0", "federation.min-sites=3")
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


def cases(scenarios: list[str], attacks: tuple[str, ...] = ("scale-update",)) -> list[Case]:
    out: list[Case] = []
    if "default" in scenarios:
        for name in STRATEGIES:
            extra = FOUR_SITE_KRUM if "krum" in name else ()
            out.append(Case("default", name, (f"strategy.name={name}", *extra)))
    if "heterogeneous" in scenarios:
        for name, cls in STRATEGIES.items():
            if cls.heterogeneous_ranks and name in ("fedit", "ffa", "flora", "fedex", "fedsa"):
                out.append(Case("heterogeneous", f"{name} ranks {MIXED_RANKS}",
                                (f"strategy.name={name}", f"simulation.site-ranks={MIXED_RANKS}")))
    if "poisoned" in scenarios:
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


def run_case(case: Case, out: Path, config_path: str | None, common: list[str]) -> dict:
    rundir = out / case.scenario / case.folder
    if not (rundir / "summary.json").exists():
        config = cfg.load_config(config_path, [*common, *case.sets])
        simulate(config, rundir)
    return {"scenario": case.scenario, "case": case.label, "strategy": case.strategy,
            "sets": list(case.sets), **summarize(rundir)}


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(results: list[dict]) -> str:
    lines = []
    for scenario in SCENARIOS:
        rows = [r for r in results if r["scenario"] == scenario]
        if not rows:
            continue
        lines += [f"### {scenario}", "",
                  "| case | test acc | test macro-F1 | site eval acc | bytes up / round | bytes down / round "
                  "| max aggregation_error |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['case']} | {_fmt(r['test_accuracy'], '.3f')} | {_fmt(r['test_macro_f1'], '.3f')} "
                         f"| {_fmt(r['eval_accuracy'], '.3f')} | {r['bytes_up_per_round']:,.0f} "
                         f"| {r['bytes_down_per_round']:,.0f} | {_fmt(r['aggregation_error_max'], '.2e')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", "-o", required=True, help="folder for the runs and the results")
    parser.add_argument("--scenario", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--attacks", default="scale-update",
                        help="poisoned scenario: comma-separated scale-update, flip-labels")
    parser.add_argument("--only", default="", help="comma-separated strategy names to keep")
    parser.add_argument("--config", "-c", help="TOML file applied to every run")
    parser.add_argument("--set", "-s", action="append", default=[], help="override for every run (repeatable)")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    if set(attacks) - {"scale-update", "flip-labels"}:
        parser.error(f"unknown attack(s) in {args.attacks!r}; known: scale-update, flip-labels")
    for case in cases(scenarios, attacks):
        if only and case.strategy not in only:
            continue
        print(f"== {case.scenario}: {case.label}", flush=True)
        try:
            results.append(run_case(case, out, args.config, args.set))
        except (SimulationFailed, cfg.ConfigError) as err:
            print(f"   failed: {err}", flush=True)
            results.append({"scenario": case.scenario, "case": case.label, "strategy": case.strategy,
                             "error": str(err)})
    done = [r for r in results if "error" not in r]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(done))
    print(markdown(done))
    return 0 if len(done) == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
