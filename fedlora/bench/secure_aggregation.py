"""Secure aggregation: its per-round cost beside a plain round and Flower's legacy SecAgg+,
the protocol's own steps in memory, and (full mode) a plain and a secure run on Ray.

(a) Four kinds of training round, on this machine, in one process:
    - `fedlora plain`: the coordinator's ordinary round (fedit), sites send float32 updates;
    - `fedlora secure`: the same round under fedlora's secure aggregation
      (fedlora/server/secure_collect.py, the site's `secure_aggregation_mod`), four Message-API stages;
    - `flower plain` / `flower secagg+`: Flower 1.42's legacy `DefaultWorkflow`, with its default
      fit workflow or `SecAggPlusWorkflow` + `secaggplus_mod` (a legacy `NumPyClient`), FedAvg.

    Every round runs the real coordinator and site code over `InProcessGrid`: each message
    is serialized through Flower's protobuf records, sites answer one after another.
    Training is replaced by a fixed synthetic update (the same in every variant), so
    what is measured is everything secure aggregation adds: key agreement, share
    exchange, masking, packing, transport, unmasking. Adapter tensors are not named as
    LoRA factors, so fedlora's plain-round `aggregation_error` diagnostic (O(sites * d * k)
    per layer, absent under secure aggregation) is not part of the plain time.

    Times are CPU seconds of this (single-threaded) process, `time.process_time`, which
    other users of a shared machine barely disturb; on an idle core wall-clock time is
    about the same. Reported per round, best of `repeats` (`large_repeats` from 5M parameters):
    `parallel` (coordinator and transport time plus, per stage, the slowest site: what
    parallel sites would take), `sequential` (all sites in turn), the ratio secure / plain
    of `parallel`, and the largest upload in bytes per parameter. The variants of a cell
    take turns, so a load change hits them alike.

(b) The protocol alone, in memory (fedlora.privacy.secagg.simulate.run_in_memory): per
    client count, client masking time (quantize + all masks + pack), server time to sum
    the uploads, and server unmasking time (rebuild secrets, strip masks, decode), without
    dropouts and with one site dropping out after key sharing; the sum is checked against
    the exact one.

(c) Full mode: `fedlora simulate` (Flower's Simulation Engine, Ray) at the default model
    (all-MiniLM-L6-v2 + LoRA), plain and secure, with 3, 20 and 100 sites, every site training
    every round: a secure round's wall time against a plain one's (the median of the rounds after
    the first, which loads the models).

Before (a) the process keeps freed memory (`steady_allocator`, glibc); the setting stays
for the rest of the `fedlora bench` process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow

from fedlora import config as cfg
from fedlora import wire
from fedlora.arrays import from_record, to_record
from fedlora.bench.engines import finished_run
from fedlora.bench.suite import BenchContext, SuiteResult, markdown_table
from fedlora.client.secure import secure_aggregation_mod
from fedlora.flower import SERVER_NODE_ID
from fedlora.privacy.secagg import messages
from fedlora.privacy.secagg.config import SecAggConfig
from fedlora.privacy.secagg.graph import default_threshold
from fedlora.privacy.secagg.simulate import run_in_memory
from fedlora.server.app import build_coordinator
from fedlora.server.rundir import RunDirectory
from fedlora.simulations.inprocess import RUN_ID, InProcessGrid

NAME = "secure-aggregation"
TITLE = "Secure aggregation: per-round cost beside Flower's SecAgg+"

TENSOR = 1 << 17  # synthetic adapter tensors of 131072 parameters
LARGE = 5_000_000  # from this many parameters a cell takes seconds: `large_repeats` rounds
CLOCK = time.process_time


@dataclass(frozen=True)
class Plan:
    params: tuple[int, ...]            # (a) adapter sizes
    sites: tuple[int, ...]             # (a) federation sizes
    repeats: int                       # (a) rounds per cell and variant; the fastest is kept
    large_repeats: int                 # (a) the same from LARGE parameters
    protocol_params: int               # (b) vector size
    protocol_clients: tuple[int, ...]  # (b)
    simulation: bool                   # (c)
    bytes_per_param: int = 4           # fedlora's masked upload width


QUICK = Plan(params=(10_000, 100_000), sites=(3, 5), repeats=2, large_repeats=1, protocol_params=100_000,
             protocol_clients=(3, 5), simulation=False)
# Full: the grid of BENCHMARKS.md's secure aggregation section (about 10 minutes on 2 cores).
FULL = Plan(params=(100_000, 1_000_000, 13_600_000), sites=(3, 10, 20), repeats=3, large_repeats=1,
            protocol_params=1_000_000, protocol_clients=(3, 10, 20), simulation=True)


@dataclass
class Measurement:
    sequential: float     # CPU seconds, sites in turn
    parallel: float       # CPU seconds, as if sites ran in parallel
    upload_per_param: float  # bytes per parameter of the largest upload (the update or masked vector)


def synthetic_state(params: int) -> dict[str, np.ndarray]:
    sizes = [TENSOR] * (params // TENSOR) + ([params % TENSOR] if params % TENSOR else [])
    return {f"adapter.{i:04d}": np.zeros(size, dtype=np.float32) for i, size in enumerate(sizes)}


def _measure(grid: InProcessGrid, run, params: int, sites: int) -> Measurement:
    grid.exchanges.clear()
    gc.collect()
    started = CLOCK()
    run()
    total = CLOCK() - started
    site_total = sum(sum(e.site_seconds) for e in grid.exchanges)
    slowest = sum(max(e.site_seconds, default=0.0) for e in grid.exchanges)
    upload = max(e.bytes_up for e in grid.exchanges) / (sites * params)
    return Measurement(total, total - site_total + slowest, upload)


# -- (a) fedlora ------------------------------------------------------------------------
def _fedlora_client(params: int) -> ClientApp:
    """fedlora's secure-aggregation mod over a `train` that returns a fixed synthetic update."""
    app = ClientApp(mods=[secure_aggregation_mod])
    base = np.random.default_rng(0).normal(0, 0.01, params).astype(np.float32)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = int(context.node_config["partition-id"])
        global_state = from_record(msg.content[wire.ARRAYS])
        delta, start = {}, 0
        for name, value in global_state.items():
            delta[name] = base[start:start + value.size] * (1 + 0.1 * site)
            start += value.size
        metrics = MetricRecord({wire.NUM_EXAMPLES: 100 + site, wire.TRAIN_LOSS: 1.0, wire.TRAIN_SECONDS: 0.0,
                                wire.LOCAL_STEPS: 0})
        return Message(RecordDict({wire.ARRAYS: to_record(delta), wire.METRICS: metrics,
                                   wire.SITE: ConfigRecord({wire.SITE_NAME: f"site-{site}"})}), reply_to=msg)

    return app


def fedlora_round(secure: bool, sites: int, params: int, bytes_per_param: int = 4) -> Measurement:
    with tempfile.TemporaryDirectory() as tmp:  # the run directory; sites keep their durable records under it
        config = cfg.load_config(None, [f"federation.num-sites={sites}", "federation.min-sites=3",
                                        f"secagg.enabled={str(secure).lower()}", f'output.dir="{tmp}"',
                                        f"secagg.bytes-per-param={bytes_per_param}", "secagg.max-weight=1000"])
        grid = InProcessGrid(_fedlora_client(params), config.to_flat(), sites, clock=CLOCK)
        coordinator = build_coordinator(grid, config, RunDirectory(tmp), None, "synthetic")
        state, nodes = synthetic_state(params), sorted(grid.get_node_ids())
        result = {}

        def run() -> None:
            result["state"], result["row"] = coordinator.train_round(nodes, state, 1)

        measurement = _measure(grid, run, params, sites)
    if result["row"]["sites"] != sites:
        raise RuntimeError(f"the fedlora round aggregated {result['row']['sites']} of {sites} sites")
    return measurement


# -- (a) Flower's legacy SecAgg+ ----------------------------------------------------------
def _legacy_client(params: int, secure: bool) -> ClientApp:
    base = np.random.default_rng(0).normal(0, 0.01, params).astype(np.float32)

    class Site(NumPyClient):
        def __init__(self, site: int):
            self.site = site

        def fit(self, parameters, config):
            return [parameters[0] + base * (1 + 0.1 * self.site)], 100 + self.site, {}

    def client_fn(context: Context):
        return Site(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])


def flower_round(secure: bool, sites: int, params: int) -> Measurement:
    grid = InProcessGrid(_legacy_client(params, secure), {}, sites, clock=CLOCK)
    fit = SecAggPlusWorkflow(num_shares=sites, reconstruction_threshold=default_threshold(sites - 1)) if secure \
        else default_fit_workflow
    timed: dict[str, Measurement] = {}

    def fit_round(grid_, context) -> None:  # only the training round is timed
        timed["fit"] = _measure(grid, lambda: fit(grid_, context), params, sites)

    strategy = FedAvg(fraction_evaluate=0.0, min_fit_clients=sites, min_available_clients=sites,
                      initial_parameters=ndarrays_to_parameters([np.zeros(params, dtype=np.float32)]))
    context = LegacyContext(Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                                    run_config={}), config=ServerConfig(num_rounds=1), strategy=strategy)
    DefaultWorkflow(fit_workflow=fit_round)(grid, context)
    return timed["fit"]


def steady_allocator() -> bool:
    """Keep freed memory in the process (glibc): how much memory the kernel maps and zeroes
    for a round otherwise depends on what ran before (measured: a 13.6M-parameter round
    spent 2/3 of its CPU time in the kernel, and the first variant of a cell paid most of
    it), which would decide the comparison instead of the algorithms."""
    libc = ctypes.util.find_library("c")
    if libc is None:
        return False
    mallopt = ctypes.CDLL(libc).mallopt
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 40))


def best(measures, repeats: int) -> list[Measurement]:
    """The fastest of `repeats` measurements of each variant (by `parallel`). The variants
    take turns, so a load change on a shared machine hits them alike."""
    runs = [[measure() for measure in measures] for _ in range(repeats)]
    return [min(column, key=lambda m: m.parallel) for column in zip(*runs)]


def round_costs(plan: Plan, progress) -> list[dict]:
    """(a): every cell of params × sites, the four variants taking turns."""
    variants = {"fedlora plain": lambda n, p: fedlora_round(False, n, p),
                "fedlora secure": lambda n, p: fedlora_round(True, n, p, plan.bytes_per_param),
                "flower plain": lambda n, p: flower_round(False, n, p),
                "flower secagg+": lambda n, p: flower_round(True, n, p)}
    for variant in variants.values():  # warm-up: imports and first-call costs stay out of the figures
        variant(3, 1000)
    rows = []
    for params, sites in progress([(p, n) for p in plan.params for n in plan.sites], "secure aggregation (a)"):
        repeats = plan.repeats if params < LARGE else plan.large_repeats
        measured = best([lambda v=v, n=sites, p=params: v(n, p) for v in variants.values()], repeats)
        by_variant = {name: asdict(x) for name, x in zip(variants, measured)}
        rows.append({"params": params, "sites": sites, "repeats": repeats, "variants": by_variant,
                     "fedlora_ratio": ratio(by_variant["fedlora secure"], by_variant["fedlora plain"]),
                     "flower_ratio": ratio(by_variant["flower secagg+"], by_variant["flower plain"])})
    return rows


def ratio(secure: dict, plain: dict) -> float:
    return secure["parallel"] / plain["parallel"]


# -- (b) the protocol in memory -----------------------------------------------------------
def in_memory_round(n: int, params: int, dropped: int, bytes_per_param: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    vectors = {1000 + i: rng.uniform(-0.5, 0.5, params).astype(np.float32) for i in range(n)}
    timings: dict[str, list[float]] = {}
    result = run_in_memory(
        vectors,
        config=SecAggConfig(bytes_per_param=bytes_per_param),
        dropouts_after_keys=list(vectors)[:dropped],
        timings=timings,
    )
    exact = sum(vectors[i].astype(np.float64) for i in result.included)
    error = float(np.abs(result.sum - exact).max())
    if error > result.max_error:
        raise RuntimeError(f"secure sum off by {error:.3g}, beyond its bound {result.max_error:.3g}")
    mask = statistics.mean(timings[f"client-{messages.MASKED_INPUT}"])
    return {
        "mask_s": mask,
        "mask_per_neighbour_per_M": mask / n / (params / 1e6),  # n - 1 pairwise + 1 self mask
        "server_sum_s": timings[f"server-{messages.MASKED_INPUT}"][0],
        "server_unmask_s": timings[f"server-{messages.UNMASK}"][0],
        "max_error": error,
    }


def dropouts(n: int) -> list[int]:
    """Sites dropping out after key sharing: none, and one where the threshold leaves room (n > 3)."""
    return [0, 1] if n > 3 else [0]


def protocol_costs(plan: Plan) -> list[dict]:
    return [{"clients": n, "params": plan.protocol_params, "dropped": d,
             **in_memory_round(n, plan.protocol_params, d, plan.bytes_per_param)}
            for n in plan.protocol_clients for d in dropouts(n)]


# -- (c) the real Simulation Engine -------------------------------------------------------
# Small sites and few steps at the default model: what secure aggregation adds to a round, not training.
SIMULATION_SETS = ("data.records-per-site=20", "train.local-steps=2", "train.batch-size=8", "model.max-length=32",
                   "federation.rounds=4", "simulation.cpus-per-site=1")
SIMULATION_SITES = (3, 20, 100)


def simulation_comparison(folder: Path, progress, sites: tuple[int, ...] = SIMULATION_SITES) -> list[dict]:
    """A plain and a secure `fedlora simulate` run per number of sites, taking turns; a finished
    run directory is reused."""
    rows = []
    for n, secure in progress([(n, secure) for n in sites for secure in (False, True)],
                              "secure aggregation (c) on Ray"):
        sets = [*SIMULATION_SETS, f"federation.num-sites={n}", f"federation.min-sites={n}",
                f"secagg.enabled={str(secure).lower()}"]
        run = finished_run("simulate", sets, folder / f"{'secure' if secure else 'plain'}-{n}")
        metrics = RunDirectory(run).read_metrics()
        params = json.loads((run / "summary.json").read_text())["parameters"]["adapter"]
        seconds = [r["round_seconds"] for r in metrics]
        rows.append({"sites": n, "secure": secure, "round_seconds": seconds,
                     "median_round_seconds": statistics.median(seconds[1:] or seconds),
                     "trained": [r["sites"] for r in metrics],
                     "bytes_up": metrics[-1]["bytes_up"], "bytes_down": metrics[-1]["bytes_down"],
                     "adapter_params": params})
    return rows


def secure_over_plain(sim: list[dict]) -> dict[int, float]:
    """Per number of sites: the secure run's median round over the plain run's."""
    median = {(r["sites"], r["secure"]): r["median_round_seconds"] for r in sim}
    return {n: median[n, True] / median[n, False] for n, secure in median if secure and (n, False) in median}


# -- the report ----------------------------------------------------------------------------
def render(fig: dict) -> str:
    rows = fig["rounds"]
    v = [r["variants"] for r in rows]
    out = [
        "#### (a) Per-round cost beside Flower's legacy SecAgg+ (one process)",
        "",
        "In-process rounds (`InProcessGrid`, every message serialized, sites in turn) with a fixed synthetic "
        "update instead of training; CPU seconds of the process, `parallel` (coordinator and transport plus, per "
        "stage, the slowest site), best of the repeats, variants taking turns. B/param: bytes of the largest "
        f"upload per parameter. Steady allocator: {fig['steady_allocator']}.",
        "",
        markdown_table(["params", "sites", "fedlora plain s", "fedlora secure s", "ratio", "B/param",
                        "flower plain s", "flower secagg+ s", "ratio", "B/param"],
                       [[f"{r['params']:,}", r["sites"], c["fedlora plain"]["parallel"],
                         c["fedlora secure"]["parallel"], f"{r['fedlora_ratio']:.1f}",
                         f"{c['fedlora secure']['upload_per_param']:.2f}", c["flower plain"]["parallel"],
                         c["flower secagg+"]["parallel"], f"{r['flower_ratio']:.1f}",
                         f"{c['flower secagg+']['upload_per_param']:.2f}"] for r, c in zip(rows, v)]),
        "",
        "Sites in turn (`sequential`: CPU seconds of all sites plus the coordinator):",
        "",
        markdown_table(["params", "sites", "repeats", "fedlora plain s", "fedlora secure s", "flower plain s",
                        "flower secagg+ s"],
                       [[f"{r['params']:,}", r["sites"], r["repeats"],
                         *(c[k]["sequential"] for k in ("fedlora plain", "fedlora secure", "flower plain",
                                                        "flower secagg+"))] for r, c in zip(rows, v)]),
        "",
        "#### (b) The protocol alone, in memory",
        "",
        f"`run_in_memory`, {fig['protocol'][0]['params']:,} parameters per client, "
        f"{fig['bytes_per_param']} bytes per parameter; dropped: sites lost after key sharing.",
        "",
        markdown_table(["clients", "dropped", "client masking s", "ms per mask per 1M params", "server sum s",
                        "server unmask s", "max abs error"],
                       [[p["clients"], p["dropped"], p["mask_s"], f"{p['mask_per_neighbour_per_M'] * 1e3:.1f}",
                         p["server_sum_s"], p["server_unmask_s"], f"{p['max_error']:.2e}"] for p in fig["protocol"]]),
        "",
        "#### (c) On Flower's Simulation Engine (Ray)",
        "",
    ]
    sim = fig["simulation"]
    if sim:
        ratio = secure_over_plain(sim)
        out += [f"`fedlora simulate` at the default model, {', '.join(f'`{s}`' for s in SIMULATION_SETS)}, every "
                f"site training every round; {sim[0]['adapter_params']:,} adapter parameters. Wall seconds per "
                "round; round 1 includes model loading; the median is over the rounds after it. Each round "
                "ends with the coordinator scoring the central test set, as a default round does.", "",
                markdown_table(["sites", "", *(f"round {i + 1} s" for i in range(len(sim[0]["round_seconds"]))),
                                "median s", "secure / plain", "bytes up / round", "bytes down / round"],
                               [[s["sites"], "secure" if s["secure"] else "plain", *s["round_seconds"],
                                 s["median_round_seconds"], f"{ratio[s['sites']]:.2f}" if s["secure"] else "",
                                 f"{s['bytes_up']:,}", f"{s['bytes_down']:,}"] for s in sim])]
    else:
        out.append("Quick mode skips the Simulation Engine (its start alone takes tens of seconds).")
    return "\n".join(out)


def run(ctx: BenchContext) -> SuiteResult:
    plan = QUICK if ctx.quick else FULL
    fig = {"steady_allocator": steady_allocator(), "bytes_per_param": plan.bytes_per_param,
           "rounds": round_costs(plan, ctx.progress), "protocol": protocol_costs(plan),
           "simulation": simulation_comparison(ctx.folder(NAME) / "simulation", ctx.progress) if plan.simulation
           else None}
    notes = ["secure-aggregation: CPU seconds of one process, best of the repeats; compare ratios within a row."]
    return SuiteResult(fig, render(fig), notes)
