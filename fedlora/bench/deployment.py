"""Model loading against local training at deployed sites, per round; the two proxies.

Runs a real loopback deployment (fedlora/simulations/loopback.py: coordinator + N
sites as separate processes, TLS, site keys) three times with the same run:
  cold    a fresh ClientApp process imports torch/transformers and loads the base
          model for every message (Flower's behaviour; `worker = false` in site.toml)
  worker  the site worker keeps the model loaded; the ClientApp process only relays
  nginx   as worker, with nginx instead of the Python proxy in front of the SuperLink
          (coordinator.toml `proxy = "nginx"`)
and reads what each site measured (`<state-dir>/timings.jsonl`, never sent) and
the run's metrics.jsonl.

Full mode: 3 sites, 3 rounds, all-MiniLM-L6-v2, 320 notes per site (about 10 minutes
on 2 cores). Quick mode: 2 sites, 2 rounds, tiny-bert, 40 notes per site; it still
starts a real deployment and a cold process per message (minutes on 2 cores), so
`fedlora bench --quick` runs it only when named (`--only deployment`).
A mode whose deployment finished is reused (its figures in <mode>/result.json).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedlora.bench.suite import BenchContext, SuiteResult, markdown_table
from fedlora.simulations.loopback import LABELS, LoopbackFederation, metrics

NAME = "deployment"
TITLE = "Deployment: model loading against local training at the sites"

MODES = ("cold", "worker", "nginx")
LABEL = {"cold": "cold (Python proxy)", "worker": "worker (Python proxy)", "nginx": "worker (nginx)"}


@dataclass(frozen=True)
class Plan:
    sites: int
    rounds: int
    model: str
    records: int  # rows per site


QUICK = Plan(sites=2, rounds=2, model="tiny-bert", records=40)
FULL = Plan(sites=3, rounds=3, model="minilm", records=320)


def _site_rounds(timings: list[dict]) -> dict[int, dict[str, float]]:
    """Per round: seconds before the site's code could work (process start, imports, model and data
    load; every message of the round together, the pre-run privacy forecast query in round one
    included, its answer too), and seconds of local training and of evaluation."""
    rounds: dict[int, dict[str, float]] = {}
    for t in timings:
        row = rounds.setdefault(t["round"], {"overhead": 0.0, "train": 0.0, "evaluate": 0.0})
        row["overhead"] += t["process_seconds"] + t.get("import_seconds", 0.0) + t["load_seconds"]
        if t["type"].startswith("train"):
            row["train"] += t.get("train_seconds", 0.0)
        elif t["type"].startswith("evaluate"):
            row["evaluate"] += t["handler_seconds"]
        else:
            row["overhead"] += t["handler_seconds"]
    return rounds


def run_mode(mode: str, root: Path, plan: Plan) -> dict:
    fed = LoopbackFederation(root / mode, num_sites=plan.sites, records=plan.records, worker=mode != "cold",
                             proxy="nginx" if mode == "nginx" else "python")
    try:
        fed.start_coordinator()
        for name in fed.sites:
            fed.start_site(name, wait=False)
        for name in fed.sites:
            fed.wait_site(name)
        out = root / mode / "run"
        command = fed.run_command(out, f'model.name="{plan.model}"', f'task.labels="{LABELS}"',
                                  f"federation.rounds={plan.rounds}", f"federation.min-sites={plan.sites}")
        done = subprocess.run(command, env=fed.env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"{mode}: fedlora run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    finally:
        fed.close()
    per_site = {name: _site_rounds([json.loads(x) for x in (fed.site_dir(name) / "state" / "timings.jsonl")
                                    .read_text().splitlines()]) for name in fed.sites}
    return {"mode": mode, "rounds": metrics(out), "sites": per_site}


def finished_mode(mode: str, root: Path, plan: Plan) -> dict:
    """A mode's figures: reused when its deployment finished before, else measured in a fresh folder."""
    saved = root / mode / "result.json"
    if not saved.exists():
        shutil.rmtree(root / mode, ignore_errors=True)  # an interrupted deployment starts over
        result = run_mode(mode, root, plan)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(result, indent=2))
    # JSON object keys are strings: the rounds of each site become ints again
    result = json.loads(saved.read_text())
    result["sites"] = {name: {int(k): v for k, v in site.items()} for name, site in result["sites"].items()}
    return result


def summarize(result: dict) -> dict[str, float]:
    rows = [r for site in result["sites"].values() for r in site.values()]
    first = [site[1] for site in result["sites"].values() if 1 in site]
    later = [r for site in result["sites"].values() for k, r in site.items() if k > 1]

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else float("nan")

    return {
        "overhead_round1": mean([r["overhead"] for r in first]),
        "overhead_later": mean([r["overhead"] for r in later]),
        "train": mean([r["train"] for r in rows]),
        "evaluate": mean([r["evaluate"] for r in rows]),
        "round_seconds": mean([r["round_seconds"] for r in result["rounds"]]),
        "round_seconds_later": mean([r["round_seconds"] for r in result["rounds"][1:]]),
    }


def render(fig: dict) -> str:
    p = fig["plan"]
    return "\n".join([
        f"A loopback deployment (`fedlora coordinator start`, {p['sites']} × `fedlora site start`, `fedlora run`: "
        f"separate processes, TLS, site keys; one torch thread per process), {p['model']} + LoRA, "
        f"{p['records']} synthetic notes per site, {p['rounds']} rounds, run once per mode: cold = a fresh "
        "ClientApp process per message (site.toml `worker = false`), worker = the site worker keeps the model "
        "loaded, with the Python proxy (worker) or nginx (nginx) in front of the SuperLink. Load overhead: per "
        "site and round, Flower's process start + fedlora imports + base model and data load, from each site's "
        "own timings.jsonl.",
        "",
        markdown_table(["sites' ClientApp (proxy)", "load overhead per site, round 1 (s)",
                        "load overhead per site, later rounds (s)", "local training per site and round (s)",
                        "round wall time, later rounds (s)"],
                       [[LABEL[mode], f"{s['overhead_round1']:.1f}", f"{s['overhead_later']:.1f}", f"{s['train']:.1f}",
                         f"{s['round_seconds_later']:.1f}"] for mode, s in fig["summaries"].items()]),
        "",
        f"Proxy: a round behind nginx takes {fig['nginx_over_python']:.2f}× a round behind the Python proxy "
        "(round wall time, later rounds; one run each, same machine, same session).",
    ])


def run(ctx: BenchContext) -> SuiteResult:
    plan = QUICK if ctx.quick else FULL
    root = ctx.folder(NAME).resolve()
    results = {mode: finished_mode(mode, root, plan) for mode in ctx.progress(MODES, "deployment modes")}
    fig = {"plan": {"sites": plan.sites, "rounds": plan.rounds, "model": plan.model, "records": plan.records},
           "summaries": {mode: summarize(result) for mode, result in results.items()},
           "results": results}
    fig["nginx_over_python"] = (fig["summaries"]["nginx"]["round_seconds_later"]
                                / fig["summaries"]["worker"]["round_seconds_later"])
    notes = ["deployment: all sites and the coordinator share this machine; a real site has its own."]
    return SuiteResult(fig, render(fig), notes)
