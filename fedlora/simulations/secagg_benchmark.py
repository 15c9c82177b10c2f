"""Per-round cost of secure aggregation: `python -m fedlora.simulations.secagg_benchmark`.

Four kinds of training round, on this machine, in one process:
- `fedlora plain`: the Coordinator's ordinary round (fedit), sites send float32 updates;
- `fedlora secure`: the same round under fedlora's secure aggregation (server/secure_round.py,
  client/secure.py), four Message-API stages;
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
about the same. Reported per round, best of `--repeats` (`--large-repeats` from 5M parameters):
`parallel` (coordinator and transport time plus, per stage, the slowest site: what
parallel sites would take; in the table), `sequential` (all sites in turn; in a
comment), the ratio secure / plain of `parallel`, and the largest upload in bytes
per parameter.
`--simulation` adds one real comparison on Flower's Simulation Engine (Ray):
`fedlora simulate` with tiny-bert, plain and secure.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import config as cfg
from fedlora import wire
from fedlora.arrays import from_record, to_record
from fedlora.client.secure import secure_aggregation_mod
from fedlora.privacy.secagg.graph import default_threshold
from fedlora.server.app import build_coordinator
from fedlora.server.rundir import RunDirectory
from fedlora.simulations.inprocess import RUN_ID, InProcessGrid

TENSOR = 1 << 17  # synthetic adapter tensors of 131072 parameters
CLOCK = time.process_time


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


# -- fedlora ----------------------------------------------------------------------
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
    config = cfg.load_config(None, [f"federation.num-sites={sites}", "federation.min-sites=3",
                                    f"secagg.enabled={str(secure).lower()}",
                                    f"secagg.bytes-per-param={bytes_per_param}", "secagg.max-weight=1000"])
    grid = InProcessGrid(_fedlora_client(params), config.to_flat(), sites, clock=CLOCK)
    with tempfile.TemporaryDirectory() as tmp:
        coordinator = build_coordinator(grid, config, RunDirectory(tmp), None, "synthetic")
        state, nodes = synthetic_state(params), sorted(grid.get_node_ids())
        result = {}

        def run() -> None:
            result["state"], result["row"] = coordinator.train_round(nodes, state, 1)

        measurement = _measure(grid, run, params, sites)
    if result["row"]["sites"] != sites:
        raise RuntimeError(f"the fedlora round aggregated {result['row']['sites']} of {sites} sites")
    return measurement


# -- Flower's legacy SecAgg+ ----------------------------------------------------------
def _legacy_client(params: int, secure: bool) -> ClientApp:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod

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
    from flwr.common import ndarrays_to_parameters
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.default_workflows import default_fit_workflow

    grid = InProcessGrid(_legacy_client(params, secure), {}, sites, clock=CLOCK)
    fit = SecAggPlusWorkflow(num_shares=sites, reconstruction_threshold=default_threshold(sites - 1)) if secure \
        else default_fit_workflow
    timed: dict[str, Measurement] = {}

    def fit_round(grid_, context) -> None:  # only the training round is timed
        timed["fit"] = _measure(grid, lambda: fit(grid_, context), params, sites)

    strategy = FedAvg(fraction_evaluate=0.0, min_fit_clients=sites, min_available_clients=sites,
                      initial_parameters=ndarrays_to_parameters([np.zeros(params, dtype=np.float32)]))
    context = LegacyContext(Context(run_id=RUN_ID, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                                    run_config={}), config=ServerConfig(num_rounds=1), strategy=strategy)
    DefaultWorkflow(fit_workflow=fit_round)(grid, context)
    return timed["fit"]


# -- the real Simulation Engine -------------------------------------------------------
def simulation_comparison(out: Path) -> list[dict]:
    from fedlora.simulations.launcher import simulate

    rows = []
    for secure in (False, True):
        config = cfg.load_config(None, ["model.name=tiny-bert", "model.max-length=32", "federation.num-sites=3",
                                        "federation.min-sites=3", "federation.rounds=2", "data.records-per-site=40",
                                        "train.local-steps=3", f"secagg.enabled={str(secure).lower()}"])
        run = simulate(config, out / ("secure" if secure else "plain"))
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        params = json.loads((run / "summary.json").read_text())["parameters"]["adapter"]
        rows.append({"secure": secure, "round_seconds": [round(r["round_seconds"], 2) for r in metrics],
                     "bytes_up": metrics[-1]["bytes_up"], "bytes_down": metrics[-1]["bytes_down"],
                     "adapter_params": params})
    return rows


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


def table(args) -> None:
    print("| params | sites | fedlora plain s | fedlora secure s | ratio | B/param | "
          "flower plain s | flower secagg+ s | ratio | B/param |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    variants = (lambda n, p: fedlora_round(False, n, p), lambda n, p: fedlora_round(True, n, p, args.bytes_per_param),
                lambda n, p: flower_round(False, n, p), lambda n, p: flower_round(True, n, p))
    for variant in variants:  # warm-up: imports and first-call costs stay out of the figures
        variant(3, 1000)
    for params in args.params:
        for sites in args.sites:
            repeats = args.repeats if params < 5_000_000 else args.large_repeats
            fp, fs, lp, ls = best([lambda v=v: v(sites, params) for v in variants], repeats)
            print(f"| {params:,} | {sites} | {fp.parallel:.3f} | {fs.parallel:.3f} | {fs.parallel / fp.parallel:.1f} | "
                  f"{fs.upload_per_param:.2f} | {lp.parallel:.3f} | {ls.parallel:.3f} | "
                  f"{ls.parallel / lp.parallel:.1f} | {ls.upload_per_param:.2f} |", flush=True)
            print(f"<!-- sequential (sites in turn): fedlora {fp.sequential:.3f} / {fs.sequential:.3f}, "
                  f"flower {lp.sequential:.3f} / {ls.sequential:.3f} -->", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, nargs="*", default=[100_000, 1_000_000, 13_600_000],
                        help="adapter sizes of the in-process table (none: skip it)")
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 20])
    parser.add_argument("--bytes-per-param", type=int, default=4, help="fedlora's masked upload width")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per cell; the fastest is reported")
    parser.add_argument("--large-repeats", type=int, default=1,
                        help="rounds per cell from 5M parameters (seconds each; keeps the default grid near 10 min)")
    parser.add_argument("--simulation", metavar="DIR", help="also compare plain and secure fedlora simulate runs")
    args = parser.parse_args()
    if args.params:
        print(f"<!-- steady allocator: {steady_allocator()} -->")
        table(args)
    if args.simulation:
        for row in simulation_comparison(Path(args.simulation)):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
