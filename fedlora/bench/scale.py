"""Scale: round time and peak memory as a simulated federation grows, on Flower's Simulation Engine.

Each cell is one `fedlora simulate` run (Ray; sites in parallel actors, one core each) in which a
share of the connected sites trains each round and the same share evaluates
(`federation.fraction-train` = `federation.fraction-evaluate`); the last round asks every connected
site to evaluate, so the run still ends with each site's own figures. Per cell:

- `sampled round`: the median wall time of the rounds before the last (train the sample, evaluate
  a sample, score the central test set): what a round costs while the run goes on;
- `last round`: the final round, in which every connected site evaluates;
- `run`: the whole command, the engine's start and every site's data check included;
- `peak memory`: the largest sum of resident memory over the command's whole process tree (the
  SuperLink, the ServerApp and every Ray process), sampled every half second. Pages shared between
  processes count once per process, so it is an upper bound.

Two series separate what a round's cost grows with: the same number of sites sampled from ever
more connected sites (cost in the sites connected would show as growth), and a fixed share of ever
more sites (cost in the sites sampled). The fit is least squares of the sampled round's seconds on
the sites sampled, over the fixed-share series.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from fedlora.bench.engines import finished_run
from fedlora.bench.suite import BenchContext, SuiteResult, markdown_table

NAME = "scale"
TITLE = "Scale: round time and memory against the sites connected and sampled"


@dataclass(frozen=True)
class Cell:
    model: str
    connected: int
    sampled: int


@dataclass(frozen=True)
class Plan:
    base: tuple[str, ...]   # settings of every run: small sites, few steps (the framework's cost, not training)
    rounds: int
    cells: tuple[Cell, ...]


BASE = ("data.records-per-site=20", "train.local-steps=2", "train.batch-size=8", "model.max-length=32",
        "federation.min-sites=1", "simulation.cpus-per-site=1")
QUICK = Plan(BASE, rounds=3, cells=(Cell("tiny-bert", 20, 2), Cell("tiny-bert", 200, 2), Cell("tiny-bert", 200, 20)))
FULL = Plan(BASE, rounds=3, cells=(
    Cell("tiny-bert", 100, 1), Cell("tiny-bert", 1000, 10), Cell("tiny-bert", 10000, 100),    # 1% of each
    Cell("tiny-bert", 100, 100), Cell("tiny-bert", 1000, 100),                                # 100 of ever more
    Cell("all-MiniLM-L6-v2", 10, 1), Cell("all-MiniLM-L6-v2", 100, 10), Cell("all-MiniLM-L6-v2", 1000, 100)))


class PeakMemory:
    """The largest total RSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _total(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass  # ended between the listing and the reading
        return total

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _model_setting(model: str) -> str:
    return "" if model == "all-MiniLM-L6-v2" else f"model.name={model}"  # MiniLM is the default model


def measure(cell: Cell, plan: Plan, root: Path) -> dict:
    """One cell's run (reused when an interrupted bench finished it) and its figures."""
    share = cell.sampled / cell.connected
    sets = [*plan.base, *filter(None, [_model_setting(cell.model)]), f"federation.num-sites={cell.connected}",
            f"federation.rounds={plan.rounds}", f"federation.fraction-train={share}",
            f"federation.fraction-evaluate={share}"]
    rundir = root / f"{cell.model}-{cell.connected}-{cell.sampled}"
    figures_file = rundir / "scale.json"
    if figures_file.exists():
        return json.loads(figures_file.read_text())
    started = time.perf_counter()
    with PeakMemory() as memory:
        finished_run("simulate", sets, rundir)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (rundir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    figures = {"model": cell.model, "connected": cell.connected, "sampled": cell.sampled,
               "trained": [r.get("sites") for r in rows], "evaluated": [r.get("evaluated") for r in rows],
               "round_seconds": [r["round_seconds"] for r in rows],
               "sampled_round_seconds": statistics.median(r["round_seconds"] for r in rows[:-1]),
               "last_round_seconds": rows[-1]["round_seconds"], "run_seconds": seconds,
               "peak_memory_bytes": memory.peak, "bytes_down_sampled_round": rows[0].get("bytes_down"),
               "settings": sets}
    figures_file.write_text(json.dumps(figures))
    return figures


def fit(cells: list[dict]) -> dict | None:
    """seconds per sampled round = fixed + per_site · sampled, over cells of one model and one share."""
    if len({c["sampled"] for c in cells}) < 2:
        return None
    slope, intercept = np.polyfit([c["sampled"] for c in cells], [c["sampled_round_seconds"] for c in cells], 1)
    return {"fixed_seconds": float(intercept), "seconds_per_sampled_site": float(slope)}


def run(ctx: BenchContext) -> SuiteResult:
    plan = QUICK if ctx.quick else FULL
    root = ctx.folder(NAME)
    cells = [measure(cell, plan, root) for cell in ctx.progress(plan.cells, "scale cells")]
    fits = {}
    for model in dict.fromkeys(c["model"] for c in cells):
        shares = {}
        for c in cells:
            if c["model"] == model:
                shares.setdefault(round(c["sampled"] / c["connected"], 6), []).append(c)
        best = max(shares.values(), key=len)  # the fixed-share series: the most cells of one share
        if (f := fit(best)) is not None:
            fits[model] = {**f, "share": best[0]["sampled"] / best[0]["connected"]}
    figures = {"cells": cells, "fits": fits, "rounds": plan.rounds, "base": list(plan.base)}
    return SuiteResult(figures=figures, markdown=markdown(figures),
                       notes=["scale: peak memory sums each process's RSS over the whole process tree, an upper "
                              "bound (shared pages count once per process)"])


def _mb(n: int) -> float:
    return n / 1e6


def markdown(f: dict) -> str:
    rows = [[c["model"], c["connected"], c["sampled"], c["sampled_round_seconds"], c["last_round_seconds"],
             c["run_seconds"], _mb(c["peak_memory_bytes"]), _mb(c["bytes_down_sampled_round"] or 0)]
            for c in f["cells"]]
    parts = [
        (f"`fedlora simulate` (Ray, one core per site actor), {f['rounds']} rounds, settings "
         f"{', '.join(f['base'])}. Each round the sampled share trains and the same share evaluates; the last "
         "round every connected site evaluates. Seconds are wall time; memory is the whole process tree."), "",
        markdown_table(["model", "sites connected", "sampled per round", "sampled round (s)",
                        "last round, all evaluate (s)", "whole run (s)", "peak memory (MB)",
                        "sent down in a sampled round (MB)"], rows)]
    for model, fitted in f["fits"].items():
        parts += ["", (f"{model}, {100 * fitted['share']:g}% sampled: a sampled round takes "
                       f"{fitted['fixed_seconds']:.2f} s + {fitted['seconds_per_sampled_site']:.3f} s per sampled "
                       "site (least squares).")]
    return "\n".join(parts)
