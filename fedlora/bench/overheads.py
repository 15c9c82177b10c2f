"""What the framework, secure aggregation and DP cost per round, and how a round grows with sites.

(a) Framework cost: a steady-state round of a real fedlora run (ServerApp and ClientApp
    over `InProcessGrid`, every message serialized; sites answer one after another)
    against the same work in a plain PyTorch loop without Flower: the same sites, data,
    seeds and steps through `fedlora.training.plain_train`, a weighted mean of the
    updates, each site's evaluation and the central test evaluation. In the full suite
    also on the real Ray Simulation Engine (`fedlora simulate`), where sites run in
    parallel actors.
(b) Secure aggregation and site DP-SGD: a round with `secagg.enabled` and a round with
    `privacy.enabled` against a plain round, same run settings, in-process; beside them
    the protocol-only cost (`secure_aggregation.fedlora_round`, a synthetic update of the
    same size) and the step cost (`privacy.step_cost`) the secure-aggregation and privacy suites measure.
(c) Round wall time as the federation grows (in-process, tiny-bert, few records per site).

A "round" is the second of two: the first also pays loading the model and the sites'
data (in-process, one model serves every site). Variants take turns, repeated, and the
median is kept, so load from other processes hits every variant alike.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedlora import config as cfg
from fedlora.bench.lora_vs_full import ratio
from fedlora.bench.privacy import step_cost
from fedlora.bench.secure_aggregation import best, fedlora_round
from fedlora.bench.suite import BenchContext, SuiteResult, markdown_table
from fedlora.data.labels import infer_labels
from fedlora.data.sites import central_test_rows, simulated_site_data
from fedlora.models import load_model, set_trainable_state, trainable_state
from fedlora.server.rundir import RunDirectory
from fedlora.simulations.inprocess import run_inprocess
from fedlora.simulations.launcher import simulate
from fedlora.strategies.base import SiteUpdate, add_delta, weighted_mean
from fedlora.tasks import build_task
from fedlora.training import evaluate_counts, plain_train, planned_steps, site_seed

NAME = "overheads"
TITLE = "Overheads: framework, secure aggregation, DP, number of sites"

ROUNDS = 2  # the second round is the steady-state one measured


@dataclass
class Plan:
    framework_sets: list[str]          # (a) run settings
    repeats: int                       # (a), (b): turns of every variant
    ray: bool                          # (a) also on the Ray Simulation Engine
    cost_sets: list[str]               # (b) run settings (3 sites)
    protocol_repeats: int              # (b) protocol-only rounds per variant (the fastest kept)
    step_repeats: int                  # (b) timed DP-SGD steps per variant
    scale_sites: list[int]             # (c)
    scale_sets: list[str] = field(default_factory=lambda: [
        "model.name=tiny-bert", "model.max-length=32", "data.records-per-site=20", "train.local-steps=2",
        "train.batch-size=8"])
    scale_repeats: int = 1


QUICK = Plan(
    framework_sets=["model.name=tiny-bert"], repeats=3, ray=False,
    cost_sets=["model.name=tiny-bert", "data.records-per-site=80", "train.local-steps=4"],
    protocol_repeats=3, step_repeats=5, scale_sites=[2, 4, 8, 16, 32])
# Full: all-MiniLM-L6-v2 at the quality suite's scale (160 notes per site) so the suite fits in ~10 minutes.
FULL = Plan(
    framework_sets=["data.records-per-site=160"], repeats=2, ray=True,
    cost_sets=["data.records-per-site=160"], protocol_repeats=3, step_repeats=10, scale_sites=[2, 4, 8, 16, 32],
    scale_repeats=3)


# -- pure helpers ----------------------------------------------------------------------
def with_rounds(sets: list[str], *extra: str) -> cfg.RunConfig:
    return cfg.load_config(None, [*sets, f"federation.rounds={ROUNDS}", *extra])


def steady(rows: list[dict], key: str = "round_seconds") -> float:
    """The last round's figure: the first also loads the model and the sites' data."""
    return float(rows[-1][key])


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def marginal_seconds(sites: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares fit seconds = fixed + per_site * sites; returns (fixed, per_site)."""
    slope, intercept = np.polyfit(np.asarray(sites, dtype=float), np.asarray(seconds, dtype=float), 1)
    return float(intercept), float(slope)


def fedavg(global_state: dict, deltas: list[dict], weights: list[float]) -> dict:
    """global + the weighted mean of the updates: fedit's own arithmetic, without its diagnostics."""

    return add_delta(global_state, weighted_mean([SiteUpdate(f"site-{i}", w, d)
                                                  for i, (w, d) in enumerate(zip(weights, deltas))]))


# -- one run ----------------------------------------------------------------------------
def inprocess(config: cfg.RunConfig, out: Path) -> tuple[list[dict], float]:
    """A whole in-process run in a fresh directory (a DP ledger must not carry over); rows, wall seconds."""

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    run_inprocess(config, out)
    return RunDirectory(out).read_metrics(), time.perf_counter() - started


class PlainRound:
    """One round's work without Flower: every site trains from the global adapter with
    plain_train (the seeds the ClientApp uses), a weighted mean of the updates, every site
    evaluates the new adapter on its held-out rows, then the central test set. One model
    serves every site, as in-process; loading and tokenizing happen once, outside the timing."""

    def __init__(self, config: cfg.RunConfig):
        self.config = config = infer_labels(config)
        self.task = task = build_task(config)
        loaded = load_model(config, task)
        self.model, self.pad, max_len = loaded.model, loaded.tokenizer.pad_token_id, config.model.max_length
        n = config.federation.num_sites
        sites = [simulated_site_data(k, n, config, task) for k in range(n)]
        self.train = [task.encode(s.train, loaded.tokenizer, max_len) for s in sites]
        self.eval = [task.encode(s.eval, loaded.tokenizer, max_len) for s in sites]
        self.test = task.encode(central_test_rows(config, task) or [], loaded.tokenizer, max_len)
        self.global_state = trainable_state(self.model)

    def __call__(self, server_round: int = ROUNDS) -> dict[str, float]:
        tc, model, task = self.config.train, self.model, self.task
        started = time.perf_counter()
        deltas, weights = [], []
        for k, examples in enumerate(self.train):
            set_trainable_state(model, self.global_state)
            plain_train(model, task, examples, tc, self.pad, site_seed(tc.seed, k, server_round))
            local = trainable_state(model)
            deltas.append({name: local[name] - self.global_state[name] for name in local})
            weights.append(len(examples))
        new_state = fedavg(self.global_state, deltas, weights)
        trained = time.perf_counter()
        set_trainable_state(model, new_state)
        for examples in [*self.eval, self.test]:
            if examples:
                evaluate_counts(model, task, examples, self.pad)
        done = time.perf_counter()
        return {"train": trained - started, "evaluate": done - trained, "total": done - started}


# -- (a) the framework's cost ---------------------------------------------------------------
def framework_cost(plan: Plan, folder: Path, progress) -> dict:
    config = with_rounds(plan.framework_sets)
    plain = PlainRound(config)
    plain()  # warm-up: first-call costs stay out of the figures
    framework, reference = [], []
    for i in progress(range(plan.repeats), "overheads (a) framework vs plain"):
        rows, wall = inprocess(config, folder / f"framework-{i}")
        framework.append({"round": steady(rows), "first_round": rows[0]["round_seconds"], "run_wall": wall})
        reference.append(plain())
    fig = {
        "model": config.model.name, "sites": config.federation.num_sites,
        "steps_per_site": [_steps(config, len(t)) for t in plain.train],
        "train_rows_per_site": [len(t) for t in plain.train], "test_rows": len(plain.test),
        "repeats": plan.repeats,
        "inprocess_round_seconds": median([f["round"] for f in framework]),
        "inprocess_first_round_seconds": median([f["first_round"] for f in framework]),
        "inprocess_run_wall_seconds": median([f["run_wall"] for f in framework]),
        "plain_round_seconds": median([r["total"] for r in reference]),
        "plain_train_seconds": median([r["train"] for r in reference]),
        "plain_evaluate_seconds": median([r["evaluate"] for r in reference]),
    }
    fig["inprocess_over_plain"] = ratio(fig["inprocess_round_seconds"], fig["plain_round_seconds"])
    fig["inprocess_overhead_seconds"] = fig["inprocess_round_seconds"] - fig["plain_round_seconds"]
    if plan.ray:
        fig.update(ray_round(config, folder / "ray", plain))
    return fig


def _steps(config: cfg.RunConfig, rows: int) -> int:
    tc = config.train
    return planned_steps(rows, tc.batch_size, tc.local_epochs, tc.local_steps)


def ray_round(config: cfg.RunConfig, out: Path, plain: PlainRound) -> dict:
    """One `fedlora simulate` run (Ray; sites are actors in parallel), then a plain round beside it."""

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    simulate(config, out)
    wall = time.perf_counter() - started
    rows = RunDirectory(out).read_metrics()
    reference = plain()
    return {"ray_round_seconds": steady(rows), "ray_first_round_seconds": rows[0]["round_seconds"],
            "ray_run_wall_seconds": wall, "ray_plain_round_seconds": reference["total"],
            "ray_over_plain": ratio(steady(rows), reference["total"]),
            "ray_cpus_per_site": config.simulation.cpus_per_site}


# -- (b) secure aggregation and DP ----------------------------------------------------------
VARIANTS = {
    "plain": [],
    "secagg": ["secagg.enabled=true"],
    # DP-SGD on the same tensors (the adapter and head) with the plain round's steps, expected batch and
    # learning rate (0: take train.*)
    "dp": ["privacy.enabled=true", "privacy.trainable=adapter", "privacy.batch-size=0", "privacy.learning-rate=0",
           "privacy.local-epochs=0"],
}


def security_costs(plan: Plan, folder: Path, progress) -> dict:
    base = [*plan.cost_sets, "federation.num-sites=3", "federation.min-sites=3"]
    configs = {name: with_rounds(base, *sets) for name, sets in VARIANTS.items()}
    rounds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    train: dict[str, list[float]] = {name: [] for name in VARIANTS}
    adapter_params = 0
    inprocess(configs["plain"], folder / "warm-up")  # imports and first-call costs stay out of the figures
    for i in progress(range(plan.repeats), "overheads (b) secagg / DP vs plain"):
        for name, config in configs.items():
            rows, _ = inprocess(config, folder / f"{name}-{i}")
            rounds[name].append(steady(rows))
            train[name].append(steady(rows, "train_seconds"))
            if name == "plain":
                adapter_params = _adapter_params(folder / f"{name}-{i}")
    fig: dict = {"model": configs["plain"].model.name, "sites": 3, "repeats": plan.repeats,
                 "adapter_parameters": adapter_params,
                 "steps_per_site": (configs["plain"].train.local_steps
                                    or f"{configs['plain'].train.local_epochs:g} epochs"),
                 "round_seconds": {k: median(v) for k, v in rounds.items()},
                 "train_seconds": {k: median(v) for k, v in train.items()}}
    fig["round_ratio"] = {k: ratio(v, fig["round_seconds"]["plain"]) for k, v in fig["round_seconds"].items()}
    fig["train_ratio"] = {k: ratio(v, fig["train_seconds"]["plain"]) for k, v in fig["train_seconds"].items()}

    # The other suites' measurements: secure aggregation's protocol alone, and one DP-SGD step.
    plain_m, secure_m = best([lambda: fedlora_round(False, 3, adapter_params),
                              lambda: fedlora_round(True, 3, adapter_params)], plan.protocol_repeats)
    fig["protocol"] = {"plain_cpu_seconds": plain_m.parallel, "secure_cpu_seconds": secure_m.parallel,
                       "ratio": ratio(secure_m.parallel, plain_m.parallel),
                       "secure_upload_bytes_per_param": secure_m.upload_per_param,
                       "repeats": plan.protocol_repeats}
    step_config = infer_labels(configs["plain"])
    fig["dp_step"] = step_cost(step_config, step_config.train.batch_size, plan.step_repeats)
    return fig


def _adapter_params(rundir: Path) -> int:
    return int(json.loads((rundir / "summary.json").read_text())["parameters"]["adapter"])


# -- (c) sites ------------------------------------------------------------------------------
def site_scaling(plan: Plan, folder: Path, progress) -> dict:
    rows_out = []
    for sites in progress(plan.scale_sites, "overheads (c) sites"):
        config = with_rounds(plan.scale_sets, f"federation.num-sites={sites}")
        runs = [inprocess(config, folder / f"sites-{sites}-{i}")[0] for i in range(plan.scale_repeats)]
        seconds = median([steady(r) for r in runs])
        rows_out.append({"sites": sites, "round_seconds": seconds, "per_site_seconds": seconds / sites,
                         "slowest_site_train_seconds": median([steady(r, "train_seconds") for r in runs]),
                         "bytes_up": runs[0][-1]["bytes_up"], "bytes_down": runs[0][-1]["bytes_down"]})
    fixed, per_site = marginal_seconds([r["sites"] for r in rows_out], [r["round_seconds"] for r in rows_out])
    return {"settings": plan.scale_sets, "repeats": plan.scale_repeats, "rows": rows_out,
            "fit_fixed_seconds": fixed, "fit_per_site_seconds": per_site}


# -- the report ------------------------------------------------------------------------------
def render(fig: dict, quick: bool) -> str:
    a, b, c = fig["framework"], fig["security"], fig["sites"]
    out = [
        "#### (a) The framework's cost per round",
        "",
        f"{a['model']}, {a['sites']} sites ({', '.join(map(str, a['train_rows_per_site']))} training rows, "
        f"{', '.join(map(str, a['steps_per_site']))} local steps), central test set of {a['test_rows']} rows; "
        f"median of {a['repeats']} turns. The fedlora round is the second of a {ROUNDS}-round run "
        "(`round_seconds`: train messages, site training, aggregation, site evaluation, central evaluation); "
        "the plain round does the same training and evaluations in a PyTorch loop, no Flower, no serialization.",
        "",
    ]
    table = [["in-process (sites in turn)", a["inprocess_round_seconds"], a["plain_round_seconds"],
              a["inprocess_over_plain"]]]
    if "ray_round_seconds" in a:
        table.append([f"Ray Simulation Engine ({a['ray_cpus_per_site']} CPU per site, sites in parallel)",
                      a["ray_round_seconds"], a["ray_plain_round_seconds"], a["ray_over_plain"]])
    out += [markdown_table(["engine", "fedlora round, s", "plain round, s", "ratio"], table), ""]
    out.append(
        f"Plain round: {a['plain_train_seconds']:.2f} s training + {a['plain_evaluate_seconds']:.2f} s evaluation. "
        f"In-process the framework adds {a['inprocess_overhead_seconds']:.2f} s per round; its first round took "
        f"{a['inprocess_first_round_seconds']:.2f} s (model and site data loading) and the whole run "
        f"{a['inprocess_run_wall_seconds']:.2f} s with start-up, final export and report.")
    if "ray_round_seconds" in a:
        out.append(
            f"On Ray (one run, beside one plain round), Ray's start and the actors' model loading are excluded "
            f"from the round (its first round took "
            f"{a['ray_first_round_seconds']:.1f} s; the whole `fedlora simulate`, Ray start included, "
            f"{a['ray_run_wall_seconds']:.1f} s). Ray's sites train in parallel, the plain loop in turn, so the "
            "ratio can fall below the in-process one.")
    elif quick:
        out.append("Quick mode skips the Ray Simulation Engine (its start alone takes tens of seconds).")
    rs, rr, tr = b["round_seconds"], b["round_ratio"], b["train_ratio"]
    p, d = b["protocol"], b["dp_step"]
    out += [
        "",
        "#### (b) Secure aggregation and DP-SGD per round",
        "",
        f"{b['model']}, 3 sites (federation.min-sites = 3), {b['adapter_parameters']:,} adapter parameters, "
        f"{b['steps_per_site']} local steps per site; in-process, median of {b['repeats']} turns of the three "
        "variants. DP: site-level DP-SGD (Opacus, hooks) with the plain round's steps, expected batch and "
        "learning rate; its round includes each site's accounting.",
        "",
        markdown_table(["round", "round, s", "× plain", "slowest site's training, s", "× plain"],
                       [[k, rs[k], rr[k], b["train_seconds"][k], tr[k]] for k in rs]),
        "",
        f"Protocol alone (`secure_aggregation.fedlora_round`: the same coordinator and site code, training replaced "
        f"by a fixed update of {b['adapter_parameters']:,} parameters; CPU seconds as if sites ran in parallel, "
        f"best of {p['repeats']}): plain {p['plain_cpu_seconds']:.3f} s, secure {p['secure_cpu_seconds']:.3f} s, "
        f"× {p['ratio']:.1f}; the masked upload takes {p['secure_upload_bytes_per_param']:.2f} bytes per parameter.",
        "",
        f"One step (`privacy.step_cost`, batch {d['batch']}, median of {d['repeats']} interleaved steps): "
        + ", ".join(f"{k} {v:.3f} s (× {d['ratio'][k]:.2f})" for k, v in d["seconds"].items()) + ".",
        "",
        "#### (c) Round wall time against the number of sites",
        "",
        f"In-process (sites in turn), {' '.join(f'`{s}`' for s in c['settings'])}; the second round of "
        f"{ROUNDS}, median of {c['repeats']} run(s); it includes the central evaluation (a fixed cost per round).",
        "",
        markdown_table(["sites", "round, s", "per site, s", "slowest site's training, s", "bytes up", "bytes down"],
                       [[r["sites"], r["round_seconds"], r["per_site_seconds"], r["slowest_site_train_seconds"],
                         f"{r['bytes_up']:,}", f"{r['bytes_down']:,}"] for r in c["rows"]]),
        "",
        f"Least-squares fit: round ≈ {c['fit_fixed_seconds']:.2f} s + {c['fit_per_site_seconds']:.3f} s × sites.",
    ]
    return "\n".join(out)


def run(ctx: BenchContext) -> SuiteResult:
    plan = QUICK if ctx.quick else FULL
    folder = ctx.folder(NAME)
    started = time.perf_counter()
    fig = {"framework": framework_cost(plan, folder / "framework", ctx.progress),
           "security": security_costs(plan, folder / "security", ctx.progress),
           "sites": site_scaling(plan, folder / "sites", ctx.progress)}
    fig["seconds"] = time.perf_counter() - started
    fig["quick"] = ctx.quick
    notes = ["overheads: in-process sites answer one after another in one process; per-round figures are the "
             f"second of {ROUNDS} rounds."]
    if ctx.quick:
        notes.append("overheads: quick mode uses tiny-bert (random weights, milliseconds per step): its ratios set "
                     "the framework's fixed costs against very little compute, not a real model's; Ray is skipped.")
    return SuiteResult(fig, render(fig, ctx.quick), notes)
