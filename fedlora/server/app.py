"""The ServerApp: what the coordinator runs, in simulation and deployment alike."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora import config as cfg
from fedlora import logs
from fedlora.frozen_base import set_base_correction
from fedlora.models import count_parameters, load_model, trainable_state
from fedlora.server.central import CentralEvaluator
from fedlora.server.report import write_report
from fedlora.server.export_correction import fold_into_exported_adapter
from fedlora.server.rounds import Coordinator
from fedlora.server.rundir import RunDirectory
from fedlora.strategies import build_strategy
from fedlora.tasks import build_task
from fedlora.versions import library_versions

log = logging.getLogger("fedlora")
app = ServerApp()


def run_directory(config) -> RunDirectory:
    out = config.output.dir or f"runs/{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    return RunDirectory(Path(out).expanduser().resolve())


@app.main()
def main(grid: Grid, context: Context) -> None:
    logs.setup()
    started = time.perf_counter()
    config = cfg.from_flat(context.run_config)
    rundir = run_directory(config)
    rundir.write_config(config.to_toml())
    rundir.start_tracking(config.output.tracking)  # output.tracking: metrics rows mirrored to TensorBoard/MLflow
    task = build_task(config)
    loaded = load_model(config, task)
    strategy = build_strategy(config)
    central = CentralEvaluator(config, task, loaded)

    global_state, start_round = trainable_state(loaded.model), 1
    checkpoint = rundir.load_checkpoint() if config.output.resume else None
    if checkpoint is not None:
        global_state, start_round = checkpoint.global_state, checkpoint.round + 1
        strategy.load_state_dict(checkpoint.strategy_state)
        rundir.truncate_metrics(checkpoint.round)
        log.info("resuming %s after round %d", rundir.path, checkpoint.round)
    elif rundir.metrics_path.exists():
        rundir.metrics_path.unlink()  # a fresh run in an old directory starts a fresh log
    log.info("run directory %s", rundir.path)

    coordinator = Coordinator(grid, config, strategy, rundir, central, loaded.fingerprint)
    if checkpoint is not None:
        coordinator.sites_seen = checkpoint.extra.get("sites", {})
        coordinator.privacy.load_state_dict(checkpoint.extra.get("privacy", {}))
    final_state = coordinator.run(global_state, start_round)

    correction = strategy.base_correction()  # FLoRA / FedEx-LoRA: part of the model is in the base
    set_base_correction(loaded.model, correction)
    central.export(final_state, rundir.path / "adapter")
    if correction:
        fold_into_exported_adapter(rundir.path / "adapter", correction, strategy.lora_scale)
    central.write_predictions(final_state, rundir.path / "predictions.jsonl")
    rows = rundir.read_metrics()
    trainable, total = count_parameters(loaded.model)
    rundir.write_summary({
        "rounds": len(rows),
        "final": rows[-1] if rows else {},
        "totals": {"bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows),
                   "seconds": sum(r["round_seconds"] for r in rows),
                   "server_seconds_this_process": time.perf_counter() - started},
        "parameters": {"adapter": trainable, "base": total - trainable, "total": total},
        "adapter_bytes_float32": 4 * trainable,
        "strategy": strategy.name,
        "sites": coordinator.sites_seen,
        "privacy": coordinator.privacy.summary(),
        "base_fingerprint": loaded.fingerprint,
        "versions": library_versions(),
    })
    write_report(rundir.path)
    log.info("done: adapter in %s, report %s", rundir.path / "adapter", rundir.path / "report.html")
