"""Curves: federated against centralized round by round, the federated recipe, and accuracy against epsilon.

Every federated run is the real ServerApp and ClientApp over the in-process
Grid (fedlora/simulations/inprocess.py), the baselines the same training code
(fedlora/bench/baselines.py); all are scored on the central test set.

1. By round: the default scenario trained federated for up to `max_rounds`
   rounds, and centralized (every site's training rows pooled, one optimizer)
   scored after each round's worth of the federation's steps. Each is "at
   convergence" at its best validation accuracy (the sites' held-out rows:
   federated evaluation for the federation, the same rows pooled for
   centralized) once `patience` rounds in a row bring no new best, and the
   round-by-round table compares them at equal compute.
2. Recipes: what moves the federation toward pooled quality, each at the
   default number of rounds, over several training seeds.
3. Epsilon: DP-SGD at each site (`privacy.enabled=true` and nothing else, the
   private recipe) at several epsilons per site and records per site, beside
   the non-private run at the same size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from fedlora import config as cfg
from fedlora.bench.baselines import centralized_curve, converged
from fedlora.bench.engines import finished_run
from fedlora.bench.quality import classification_test_sets
from fedlora.bench.suite import BenchContext, SuiteResult, cell, markdown_table

NAME = "curves"
TITLE = "Curves: federated against centralized by round, the recipe, and accuracy against epsilon"


@dataclass(frozen=True)
class Recipe:
    name: str
    folder: str
    sets: tuple[str, ...]


@dataclass(frozen=True)
class Scale:
    base: tuple[str, ...]            # settings of every run (on top of the defaults)
    rounds: int                      # the federation's rounds for recipes and epsilon runs
    max_rounds: int                  # of the by-round curves
    patience: int
    recipes: tuple[Recipe, ...]
    seeds: tuple[int, ...]           # train.seed of each recipe run
    sizes: dict[int, tuple[str, ...]]  # records per site -> settings of its epsilon runs
    epsilons: tuple[float, ...]
    test_notes: int | None           # None: the default scenario's 500


RECIPES = (
    Recipe("1 local epoch", "epochs-1", ("train.local-epochs=1",)),
    Recipe("2 local epochs (the default)", "default", ()),
    Recipe("2 local epochs, fedex", "fedex", ("strategy.name=fedex",)),
)
# Quick mode: every kind of run once, on a few records and steps.
QUICK = Scale(base=("data.records-per-site=96",), rounds=2, max_rounds=3, patience=1,
              recipes=RECIPES[:2], seeds=(0,), sizes={96: ("privacy.batch-size=16",)}, epsilons=(8.0,),
              test_notes=100)
# Full mode: the default scenario (4 sites, 320 records each, 5 rounds), about 2 hours on 2 cores. At 2,000
# records per site one run takes 30-40 minutes there (a DP-SGD step reads 256 notes), so the curve at that
# size is left to a larger machine: add `2000: ("privacy.batch-size=256",)` to `sizes`.
FULL = Scale(base=(), rounds=5, max_rounds=12, patience=3, recipes=RECIPES, seeds=(0, 1),
             sizes={320: ()}, epsilons=(1.0, 2.0, 4.0, 8.0, 16.0), test_notes=None)


def federated_rounds(folder: Path, sets: list[str]) -> dict:
    """A federated run's metrics per round and its summary; a finished run directory is reused."""
    finished_run("in-process", sets, folder)
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((folder / "summary.json").read_text())
    epsilon = summary.get("privacy", {}).get("site_level", {}).get("epsilon")
    return {"rounds": [{k: r.get(k) for k in ("round", "eval_accuracy", "test_accuracy", "test_macro_f1")}
                       for r in rounds if "test_accuracy" in r],
            "epsilon": epsilon, "seconds": summary["totals"]["seconds"]}


def at_convergence(points: list[dict], key: str, patience: int) -> dict:
    best, stop = converged([p[key] for p in points], patience)
    return {"round": points[best]["round"], "test_accuracy": points[best]["test_accuracy"],
            "stopped_at": points[stop]["round"]}


def by_round(ctx: BenchContext, scale: Scale, sets: list[str]) -> dict:
    root = ctx.folder(NAME) / "by-round"
    fed = federated_rounds(root / "federated", [*sets, f"federation.rounds={scale.max_rounds}"])
    path = root / "centralized.json"
    if not path.exists():
        config = cfg.load_config(None, [*sets, f"federation.rounds={scale.rounds}"])
        path.write_text(json.dumps(centralized_curve(config, scale.max_rounds, scale.patience)))
    central = json.loads(path.read_text())
    return {"federated": fed["rounds"], "centralized": central["rounds"],
            "steps_per_round": central["steps_per_round"],
            "federated_converged": at_convergence(fed["rounds"], "eval_accuracy", scale.patience),
            "centralized_converged": at_convergence(central["rounds"], "validation_accuracy", scale.patience)}


def recipes(ctx: BenchContext, scale: Scale, sets: list[str]) -> list[dict]:
    root = ctx.folder(NAME) / "recipes"
    rows = []
    for recipe in ctx.progress(scale.recipes, "recipes"):
        runs = [federated_rounds(root / f"{recipe.folder}-seed{s}",
                                 [*sets, *recipe.sets, f"federation.rounds={scale.rounds}", f"train.seed={s}"])
                for s in scale.seeds]
        accuracies = [run["rounds"][-1]["test_accuracy"] for run in runs]
        rows.append({"recipe": recipe.name, "sets": list(recipe.sets), "test_accuracy": mean(accuracies),
                     "per_seed": accuracies, "seconds": mean(run["seconds"] for run in runs)})
    return rows


def epsilon_curve(ctx: BenchContext, scale: Scale, sets: list[str]) -> list[dict]:
    root = ctx.folder(NAME) / "epsilon"
    rows = []
    for records, dp_sets in scale.sizes.items():
        size = [*sets, f"data.records-per-site={records}", f"federation.rounds={scale.rounds}"]
        runs = [(None, size)] + [(eps, [*size, "privacy.enabled=true", f"privacy.epsilon={eps:g}", *dp_sets])
                                 for eps in scale.epsilons]
        for eps, run_sets in ctx.progress(runs, f"epsilon, {records} records per site"):
            result = federated_rounds(root / f"{records}" / ("non-private" if eps is None else f"eps-{eps:g}"),
                                      run_sets)
            final = result["rounds"][-1]
            rows.append({"records_per_site": records, "target_epsilon": eps, "epsilon": result["epsilon"],
                         "test_accuracy": final["test_accuracy"], "test_macro_f1": final["test_macro_f1"],
                         "seconds": result["seconds"]})
    return rows


def run(ctx: BenchContext) -> SuiteResult:
    scale = QUICK if ctx.quick else FULL
    sets = [*scale.base, *classification_test_sets(ctx.folder(NAME), scale.test_notes)]
    curve = by_round(ctx, scale, sets)
    recipe_rows = recipes(ctx, scale, sets)
    eps_rows = epsilon_curve(ctx, scale, sets)
    figures = {"by_round": curve, "recipes": recipe_rows, "epsilon": eps_rows,
               "settings": {"base": list(scale.base), "rounds": scale.rounds, "max_rounds": scale.max_rounds,
                            "patience": scale.patience, "seeds": list(scale.seeds)},
               "plots": plots(curve, eps_rows)}
    return SuiteResult(figures=figures, markdown=markdown(curve, recipe_rows, eps_rows, scale))


def plots(curve: dict, eps_rows: list[dict]) -> list[dict]:
    """Line charts for the bench report (fedlora/bench/report.py): series of [x, y] points."""
    by_round = {"title": "Test accuracy by round, at equal compute",
                "x_label": "round (centralized: the federation's steps of that many rounds)",
                "y_label": "test accuracy",
                "series": {"federated": [[p["round"], p["test_accuracy"]] for p in curve["federated"]],
                           "centralized": [[p["round"], p["test_accuracy"]] for p in curve["centralized"]]}}
    by_epsilon = {"title": "Test accuracy against epsilon per site (DP-SGD)", "x_label": "epsilon per site",
                  "y_label": "test accuracy", "series": {}}
    for records in dict.fromkeys(r["records_per_site"] for r in eps_rows):
        rows = [r for r in eps_rows if r["records_per_site"] == records]
        private = [[r["target_epsilon"], r["test_accuracy"]] for r in rows if r["target_epsilon"] is not None]
        by_epsilon["series"][f"{records} records per site, DP-SGD"] = private
        plain = next((r["test_accuracy"] for r in rows if r["target_epsilon"] is None), None)
        if plain is not None and private:  # non-private has no epsilon: a level line across the plot
            xs = [x for x, _ in private]
            by_epsilon["series"][f"{records} records per site, non-private"] = [[min(xs), plain], [max(xs), plain]]
    return [by_round, by_epsilon]


def peak(points: list[dict]) -> tuple[int, float]:
    best = max(points, key=lambda p: p["test_accuracy"])
    return best["round"], best["test_accuracy"]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def markdown(curve: dict, recipe_rows: list[dict], eps_rows: list[dict], scale: Scale) -> str:
    fed, central = curve["federated"], {p["round"]: p for p in curve["centralized"]}
    fc, cc = curve["federated_converged"], curve["centralized_converged"]
    at_default = next((p for p in fed if p["round"] == scale.rounds), fed[-1])
    settings = ", ".join(scale.base) or "the default scenario"
    parts = [
        f"Federated (the default recipe, {settings}) and centralized (every site's training rows pooled, "
        f"one optimizer, {curve['steps_per_round']} steps per round: what the sites take in one round together), "
        "central test accuracy. Validation: the sites' held-out rows. At convergence: the best validation round "
        f"once {scale.patience} more round(s) in a row bring no new best.", "",
        markdown_table(["", "round", "test accuracy", "/ centralized at convergence"], [
            ["centralized at convergence", cc["round"], cc["test_accuracy"], 1.0],
            ["federated at convergence", fc["round"], fc["test_accuracy"],
             ratio(fc["test_accuracy"], cc["test_accuracy"])],
            [f"federated after the default {scale.rounds} rounds", at_default["round"],
             at_default["test_accuracy"], ratio(at_default["test_accuracy"], cc["test_accuracy"])],
            ["centralized, its best test round (chosen on the test set: an upper bound)", *peak(curve["centralized"]),
             ratio(peak(curve["centralized"])[1], cc["test_accuracy"])],
            ["federated, its best test round (the same)", *peak(fed), ratio(peak(fed)[1], cc["test_accuracy"])]]),
        "",
        "Round by round (equal compute):", "",
        markdown_table(["round", "federated", "centralized", "federated / centralized"],
                       [[p["round"], p["test_accuracy"], central.get(p["round"], {}).get("test_accuracy"),
                         ratio(p["test_accuracy"], central.get(p["round"], {}).get("test_accuracy"))]
                        for p in fed]), "",
        f"Recipes, {scale.rounds} rounds, train.seed {', '.join(str(s) for s in scale.seeds)} (test accuracy: "
        "the mean, then each seed):", "",
        markdown_table(["recipe", "settings", "test accuracy", "per seed", "/ centralized at convergence",
                        "seconds per run (in-process)"],
                       [[r["recipe"], " ".join(r["sets"]) or "–", r["test_accuracy"],
                         " / ".join(cell(a) for a in r["per_seed"]), ratio(r["test_accuracy"], cc["test_accuracy"]),
                         round(r["seconds"])] for r in recipe_rows]), "",
        f"DP-SGD at each site (`privacy.enabled=true`, the private recipe), {scale.rounds} rounds, target epsilon "
        "per site for the whole run (delta 1e-5), against the non-private run at the same size:", "",
        markdown_table(["records per site", "epsilon (target / spent)", "test accuracy", "test macro-F1",
                        "/ non-private"], epsilon_table(eps_rows))]
    return "\n".join(parts)


def epsilon_table(rows: list[dict]) -> list[list]:
    plain = {r["records_per_site"]: r["test_accuracy"] for r in rows if r["target_epsilon"] is None}
    return [[r["records_per_site"],
             "non-private" if r["target_epsilon"] is None else f"{r['target_epsilon']:g} / {cell(r['epsilon'])}",
             r["test_accuracy"], r["test_macro_f1"], ratio(r["test_accuracy"], plain.get(r["records_per_site"]))]
            for r in rows]
