"""Differential privacy: utility at a target epsilon per site against non-private, and the
cost of a DP-SGD step against a plain step.

1. Step cost: one site's model (full mode: all-MiniLM-L6-v2 with LoRA), the same
   batch, timed steps interleaved round-robin (so load from other processes
   hits every variant alike); the median per variant and its ratio to the plain
   step. Plain = forward, mean loss, backward, AdamW; DP = per-sample clipping
   (Opacus hooks, or ghost clipping) + Gaussian noise + AdamW.
3. Client-level DP, the example of docs/privacy.md (200 sites, q = 0.1, noise
   multiplier 1.68, planned for epsilon 3 over 100 rounds; quick mode: 20
   rounds), in-process with tiny-bert: the epsilon the coordinator reports
   (amplified by its secret Poisson sampling) beside the same run without
   amplification, for the most-sampled site and for an average one.
2. Utility: a federated run once non-private and once per target epsilon (each
   site calibrates its sigma). Full mode: `fedlora simulate` (Ray) on the default
   scenario (4 hospitals) at epsilon 1, 3 and 8, then the same scenario with
   2,000 notes per site and an expected DP batch of 256 at epsilon 8, where
   DP-SGD learns. Quick mode: tiny-bert, 2 short rounds, in-process
   (fedlora/simulations/inprocess.py), epsilon 8 only, 100 test notes.

A finished run directory under the suite's folder is reused, so an interrupted
bench continues; the step cost is measured anew each time.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlora import config as cfg
from fedlora.bench.engines import finished_run
from fedlora.bench.quality import classification_test_sets
from fedlora.bench.suite import BenchContext, SuiteResult, markdown_table
from fedlora.data.labels import infer_labels
from fedlora.data.sites import simulated_site_data
from fedlora.models import load_model
from fedlora.privacy.dpsgd import DPSGD, DPSettings
from fedlora.privacy.secagg.distributed_dp import epsilon_of_releases
from fedlora.privacy.units import build_units
from fedlora.tasks import build_task
from fedlora.training import LocalTraining, trainable

NAME = "privacy"
TITLE = ("Differential privacy: utility at epsilon per site, the cost of a DP-SGD step, and client-level "
         "epsilon with and without amplification")


@dataclass(frozen=True)
class Scenario:
    caption: str
    sets: tuple[str, ...]          # config overrides of every run of the scenario
    epsilons: tuple[float, ...]    # target epsilon per site; a non-private run comes first

    @property
    def folder(self) -> str:
        return self.caption.replace(" ", "-").replace(",", "")


@dataclass(frozen=True)
class ClientLevel:
    sites: int
    fraction: float
    noise_multiplier: float
    rounds: int

    @property
    def sets(self) -> list[str]:
        return ["model.name=tiny-bert", "model.max-length=32", "data.records-per-site=10", "train.local-steps=1",
                f"federation.num-sites={self.sites}", f"federation.fraction-train={self.fraction}",
                f"federation.rounds={self.rounds}", "privacy.client-dp=true",
                f"privacy.client-noise-multiplier={self.noise_multiplier}", "privacy.client-epsilon=100"]


@dataclass(frozen=True)
class Plan:
    scenarios: tuple[Scenario, ...]
    engine: str                    # fedlora.bench.engines.ENGINES: simulate or in-process
    step_sets: tuple[str, ...]     # the step-cost comparison's model and settings
    step_batch: int
    step_repeats: int              # timed steps per variant
    client_level: ClientLevel = ClientLevel(200, 0.1, 1.68, 100)
    test_notes: int | None = None  # central test notes; None: the default scenario's 500


QUICK = Plan(
    scenarios=(Scenario("tiny-bert, 2 rounds, 40 notes per site",
                        ("model.name=tiny-bert", "model.max-length=32", "federation.rounds=2",
                         "data.records-per-site=40", "train.local-steps=2", "privacy.batch-size=16",
                         "privacy.local-epochs=1"), (8.0,)),),
    engine="in-process", step_sets=("model.name=tiny-bert",), step_batch=16, step_repeats=3,
    client_level=ClientLevel(200, 0.1, 1.68, 20), test_notes=100)
FULL = Plan(
    scenarios=(Scenario("default scenario", (), (1.0, 3.0, 8.0)),
               Scenario("2000 notes per site, expected DP batch 256",
                        ("data.records-per-site=2000", "privacy.batch-size=256"), (8.0,))),
    engine="simulate", step_sets=(), step_batch=64, step_repeats=10)


# -- 1. step cost -------------------------------------------------------------------
def step_cost(config: cfg.RunConfig, batch_size: int, repeats: int) -> dict:
    """One step of the training loop on the same batch: plain, DP-SGD with hooks, DP-SGD with ghost
    clipping (both with Opacus' secure_mode noise, as sites run them), and DP-SGD with hooks and plain
    Gaussian noise (what secure_mode costs); steps interleaved round-robin, the median per variant."""
    task = build_task(config)
    loaded = load_model(config, task)
    model, pad_id = loaded.model, loaded.tokenizer.pad_token_id
    site = simulated_site_data(0, config.federation.num_sites, config, task)
    examples = task.encode(site.train, loaded.tokenizer, config.model.max_length)[:batch_size]
    batch = list(range(len(examples)))
    units = build_units(site.train[:len(examples)], "", 1)

    def loop(mode: str | None, secure: bool = True) -> LocalTraining:
        dp = None if mode is None else DPSGD(units, 1.0, 1.0, DPSettings(1.0, mode, secure_mode=secure),
                                             torch.Generator(loaded.device).manual_seed(0))
        return LocalTraining(model, task, examples, pad_id, steps=1, seed=0, learning_rate=1e-4,
                             batch_size=len(examples), steps_method=dp)

    variants = (("plain", None, True), ("dp-hooks", "hooks", True), ("dp-ghost", "ghost", True),
                ("dp-hooks, plain noise", "hooks", False))
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _ in range(repeats + 1):  # the first pass warms up and is dropped
        for name, mode, secure in variants:
            running = loop(mode, secure).start()  # hooks attached outside the timed step
            start = time.perf_counter()
            running.step(batch)
            times[name].append(time.perf_counter() - start)
            running.finish(failed=True)  # one timed step: no did-it-train check
    median = {k: statistics.median(v[1:]) for k, v in times.items()}
    n_params = sum(p.numel() for p in trainable(model))
    return {"model": config.model.name, "batch": len(examples), "max_length": config.model.max_length,
            "trainable_parameters": n_params, "repeats": repeats,
            "seconds": median, "ratio": {k: v / median["plain"] for k, v in median.items()},
            "per_sample_grad_mib_hooks": len(examples) * n_params * 4 / 2 ** 20}


# -- 2. utility -----------------------------------------------------------------------
def run_names(epsilons: tuple[float, ...]) -> list[tuple[str, float | None]]:
    """(run folder, target epsilon): the non-private run first."""
    return [("non-private", None), *((f"eps-{eps:g}", eps) for eps in epsilons)]


def privacy_sets(epsilon: float | None) -> list[str]:
    """DP-SGD on the adapter and head, as this suite has always measured it (the default private recipe,
    the head alone, is measured by the curves suite)."""
    return [] if epsilon is None else ["privacy.enabled=true", f"privacy.epsilon={epsilon:g}",
                                       "privacy.trainable=adapter"]


def utility_row(name: str, epsilon: float | None, summary: dict) -> dict:
    final, privacy = summary["final"], summary.get("privacy", {}).get("site_level", {})
    sites = privacy.get("sites", {}) if epsilon is not None else {}
    return {"run": name, "target_epsilon": epsilon, "rounds": summary["rounds"],
            "test_accuracy": final.get("test_accuracy"), "test_macro_f1": final.get("test_macro_f1"),
            "eval_accuracy": final.get("eval_accuracy"), "epsilon": privacy.get("epsilon"),
            "delta": privacy.get("delta"),
            "sigma": sorted({round(s["noise_multiplier"], 3) for s in sites.values()}),
            "seconds": summary["totals"]["seconds"]}


def utility(scenario: Scenario, engine: str, test_sets: list[str], folder: Path, progress) -> list[dict]:
    rows = []
    for name, eps in progress(run_names(scenario.epsilons), f"privacy: {scenario.caption}"):
        rundir = finished_run(engine, [*scenario.sets, *test_sets, *privacy_sets(eps)], folder / name)
        rows.append(utility_row(name, eps, json.loads((rundir / "summary.json").read_text())))
    return rows


# -- 3. client-level DP: epsilon with and without amplification -------------------------
def client_level(example: ClientLevel, folder: Path) -> dict:
    """The reported (amplified) client-level epsilon of a run, and the same rounds without amplification."""
    rundir = finished_run("in-process", example.sets, folder / "client-level")
    level = json.loads((rundir / "summary.json").read_text())["privacy"]["client_level"]
    rows = [json.loads(line) for line in (rundir / "metrics.jsonl").read_text().splitlines()]
    average = sum(r["sites"] for r in rows) / example.sites  # rounds an average site took part in
    return {"sites": example.sites, "fraction": example.fraction, "noise_multiplier": example.noise_multiplier,
            "rounds": len(rows), "delta": level["delta"], "epsilon": level["epsilon"],
            "epsilon_unamplified_most_sampled": level["epsilon_unamplified"],
            "average_site_rounds": average,
            "epsilon_unamplified_average_site": epsilon_of_releases(
                [example.noise_multiplier] * round(average), level["delta"])}


def client_level_table(c: dict) -> str:
    return markdown_table(
        ["epsilon", "value", "what it assumes"],
        [["reported (amplified by sampling at q)", f"{c['epsilon']:.2f}",
          "the coordinator is honest and keeps its Poisson sample secret"],
         ["without amplification, the most-sampled site", f"{c['epsilon_unamplified_most_sampled']:.2f}",
          "nothing about the sample (summary.json's epsilon_unamplified)"],
         [f"without amplification, an average site ({c['average_site_rounds']:.1f} rounds)",
          f"{c['epsilon_unamplified_average_site']:.2f}", "nothing about the sample"]])


# -- the report ------------------------------------------------------------------------
def utility_table(rows: list[dict]) -> str:
    def spent(r: dict) -> str:
        return "—" if r["target_epsilon"] is None else \
            f"{r['target_epsilon']:g} / {r['epsilon']:.2f}, {r['delta']:g}"

    return markdown_table(
        ["run", "epsilon per site (target / spent, delta)", "sigma", "test accuracy", "test macro-F1",
         "site eval accuracy", "rounds", "seconds"],
        [[r["run"], spent(r), ", ".join(f"{s:g}" for s in r["sigma"]) or "—", r["test_accuracy"],
          r["test_macro_f1"], r["eval_accuracy"], r["rounds"], f"{r['seconds']:.1f}"] for r in rows])


def render(fig: dict) -> str:
    engine = "`fedlora simulate` (Ray)" if fig["engine"] == "simulate" else "in-process (sites in turn)"
    out = []
    for scenario in fig["utility"]:
        sets = ", ".join(f"`{s}`" for s in scenario["sets"]) or "the `fedlora simulate` defaults"
        out += [f"#### Utility: {scenario['caption']}", "",
                f"{engine}, {sets}; central test set of {fig['test_notes']} notes; each site calibrates sigma "
                "to its target epsilon for the whole run.", "",
                utility_table(scenario["rows"]), ""]
    cost = fig["step_cost"]
    out += ["#### Cost of a DP-SGD step", "",
            f"{cost['model']}, batch {cost['batch']}, max length {cost['max_length']}, "
            f"{cost['trainable_parameters']:,} trainable parameters, median of {cost['repeats']} interleaved steps:",
            "",
            markdown_table(["step", "seconds", "× plain"],
                           [[k, v, f"{cost['ratio'][k]:.2f}"] for k, v in cost["seconds"].items()]),
            "",
            f"Per-sample gradients that hooks mode holds for this batch: {cost['per_sample_grad_mib_hooks']:.1f} MiB "
            "(ghost clipping keeps only their norms). The first three steps draw their noise in Opacus' secure_mode, "
            "as sites do; \"plain noise\" is the same hooks step with one Gaussian draw per coordinate."]
    c = fig["client_level"]
    out += ["", "#### Client-level DP: epsilon with and without amplification", "",
            f"In-process, tiny-bert; {c['sites']} sites, each sampled with probability q = {c['fraction']:g} per round "
            f"(Poisson, secret), noise multiplier {c['noise_multiplier']:g}, {c['rounds']} rounds, delta "
            f"{c['delta']:g}:", "", client_level_table(c)]
    return "\n".join(out)


def run(ctx: BenchContext) -> SuiteResult:
    plan = QUICK if ctx.quick else FULL
    folder = ctx.folder(NAME)
    step_config = infer_labels(cfg.load_config(None, list(plan.step_sets)))
    test_sets = classification_test_sets(folder, plan.test_notes)
    fig = {"engine": plan.engine, "test_notes": plan.test_notes or 500,
           "step_cost": step_cost(step_config, plan.step_batch, plan.step_repeats),
           "utility": [{"caption": s.caption, "sets": list(s.sets),
                        "rows": utility(s, plan.engine, test_sets, folder / s.folder, ctx.progress)}
                       for s in plan.scenarios],
           "client_level": client_level(plan.client_level, folder)}
    notes = []
    if ctx.quick:
        notes.append("privacy: quick mode trains tiny-bert (random weights) for 2 short rounds: its accuracies are "
                     "chance, private or not; it checks that every run and the accounting go through.")
    return SuiteResult(fig, render(fig), notes)
