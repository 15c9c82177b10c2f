"""The ServerApp: what the coordinator runs, in simulation and deployment alike.

It parses the run's configuration, fills in what only the data can tell (the
label names, when the run leaves them empty), composes the round pipeline
(collector, strategy and its wrappers), resumes from the run directory's last
checkpoint when asked, runs the rounds, and writes the run directory: the
adapter in PEFT format, predictions, summary and report.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora import config as cfg
from fedlora import flower, logs
from fedlora.data.labels import infer_labels
from fedlora.frozen_base import set_base_correction
from fedlora.models import count_parameters, load_model, trainable_state
from fedlora.privacy.server import ServerPrivacy, finite
from fedlora.server import drift_check
from fedlora.server.central import CentralEvaluator
from fedlora.server.collect import Messenger, PlainCollector
from fedlora.server.export_correction import fold_into_exported_adapter
from fedlora.server.model_card import write_model_card
from fedlora.server.model_registry import COMPARISON, ModelRegistry, RegistryError, pair_id
from fedlora.server.pipeline import Coordinator
from fedlora.server.report import write_report
from fedlora.server.rundir import RunDirectory, RunDirectoryError
from fedlora.server.secure_collect import SecureCollector
from fedlora.server.warm_start import load_warm_start
from fedlora.strategies.compose import server_strategy
from fedlora.tasks import build_task
from fedlora.versions import library_versions

log = logging.getLogger("fedlora")
app = ServerApp()


def run_directory(config) -> RunDirectory:
    out = config.output.dir or f"runs/{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    return RunDirectory(Path(out).expanduser().resolve())


def build_coordinator(grid: Grid, config: cfg.RunConfig, rundir: RunDirectory, central: CentralEvaluator,
                      fingerprint: str) -> Coordinator:
    """The round pipeline this configuration composes: its strategy (with the server-side
    wrappers the run enables) and its collector (plain, or secure aggregation)."""
    strategy = server_strategy(config)
    messenger = Messenger(grid, ServerPrivacy(config))
    if config.secagg.enabled:
        collector = SecureCollector(messenger, config, strategy.uploaded)
    else:
        collector = PlainCollector(messenger, config.federation.round_timeout)
    return Coordinator(grid, config, strategy, collector, messenger, rundir, central, fingerprint)


@app.main()
def main(grid: Grid, context: Context) -> None:
    logs.setup()
    flower.deliver_by_destination()  # on the Simulation Engine: rounds cost the sites sampled, not connected
    started = time.perf_counter()
    config = infer_labels(cfg.from_flat(context.run_config))  # `flwr run` may leave task.labels empty
    rundir = run_directory(config)
    rundir.clear_failure()
    try:
        run(grid, config, rundir, started)
    except Exception as err:  # recorded for `fedlora run`, then raised to Flower as before
        reason = str(err) if isinstance(err, RunDirectoryError) else f"{type(err).__name__}: {err}"
        log.error("the run failed: %s", reason)
        rundir.mark_failed(reason)
        raise


def run(grid: Grid, config: cfg.RunConfig, rundir: RunDirectory, started: float) -> None:
    """Compose the pipeline, resume or start, run the rounds, write the run directory."""
    rundir.write_config(config.to_toml())
    rundir.start_tracking(config.output.tracking)  # output.tracking: metrics rows mirrored to TensorBoard/MLflow
    task = build_task(config)
    simulated = flower.simulated_sites(grid)
    # In a simulation the coordinator computes where its sites do: a GPU only with their share of one.
    loaded = load_model(config, task, gpu_allowed=not simulated or config.simulation.gpus_per_site > 0)
    central = CentralEvaluator(config, task, loaded, simulated)  # which test set is the run's
    coordinator = build_coordinator(grid, config, rundir, central, loaded.fingerprint)
    if config.model.compare_with:
        compare_models(coordinator, config, loaded, rundir)
        return
    if config.federation.drift_check:
        check_drift(coordinator, config, rundir)
        return

    global_state, start_round, lineage = trainable_state(loaded.model), 1, None
    checkpoint = rundir.load_checkpoint() if config.output.resume else None
    if checkpoint is not None:
        global_state, start_round = checkpoint.global_state, checkpoint.round + 1
        coordinator.load_state_dict(checkpoint.state)
        rundir.truncate_metrics(checkpoint.round)
        lineage = rundir.read_lineage()  # a warm start is not read again: the checkpoint went on from it
        log.info("resuming %s after round %d", rundir.path, checkpoint.round)
    else:
        rundir.lineage_path.unlink(missing_ok=True)
        if config.model.warm_start:
            warm = load_warm_start(config.model.warm_start, config, loaded.model)
            global_state = warm.state
            warm.scores = central.evaluate(global_state) if central.has_test_set else {}  # where it starts
            lineage = warm.summary()
            rundir.write_lineage(lineage)
            log.info("starting from the adapter in %s (sha256 %s)%s", warm.folder, warm.sha256[:16],
                     "".join(f", {k} {v:.4g}" for k, v in warm.scores.items()))
        if rundir.metrics_path.exists():
            rundir.metrics_path.unlink()  # a fresh run in an old directory starts a fresh log
    log.info("run directory %s", rundir.path)
    final_state = coordinator.run(global_state, start_round)

    strategy = coordinator.strategy
    correction = strategy.base_correction()  # FLoRA / FedEx-LoRA: part of the model is in the base
    set_base_correction(loaded.model, correction)
    central.export(final_state, rundir.path / "adapter")
    if correction:
        fold_into_exported_adapter(rundir.path / "adapter", correction, strategy.lora_scale)
    central.write_predictions(final_state, rundir.path / "predictions.jsonl")
    rows = rundir.read_metrics()
    trainable, total = count_parameters(loaded.model)
    privacy = finite({**coordinator.privacy.summary(), **strategy.guarantees()})  # JSON: an infinite epsilon is null
    rundir.write_summary({
        "rounds": len(rows),
        "final": rows[-1] if rows else {},
        "totals": {"bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows),
                   "seconds": sum(r["round_seconds"] for r in rows),
                   "server_seconds_this_process": time.perf_counter() - started},
        "parameters": {"adapter": trainable, "base": total - trainable, "total": total},
        "adapter_bytes_float32": 4 * trainable,
        "strategy": strategy.name,
        "central_test": central.test_set.summary(),  # which set test_* are scored on, or none
        # Under client-level DP which sites took part is secret (amplification by sampling depends on it).
        "sites": {} if strategy.needs_secret_sampling else coordinator.sites_seen,
        "privacy": privacy,
        "base_fingerprint": loaded.fingerprint,
        "warm_start": lineage,
        "versions": library_versions(),
    })
    write_model_card(rundir.path / "adapter", config, rundir.path / "summary.json")  # the card with the run's figures
    write_report(rundir.path)
    if config.output.registry:
        try:
            version = ModelRegistry(config.output.registry).register(rundir.path)
            log.info("registered as %s in %s (not current until promoted)", version, config.output.registry)
        except (RegistryError, OSError) as err:  # the run itself succeeded: its adapter is in its directory
            log.warning("the run's adapter was not registered: %s", err)
    log.info("done: adapter in %s, report %s", rundir.path / "adapter", rundir.path / "report.html")


def compare_models(coordinator: Coordinator, config: cfg.RunConfig, loaded, rundir: RunDirectory) -> None:
    """An evaluation-only run (model.compare-with): the candidate (model.warm-start) and the current model,
    each scored at every site in the same round; comparison.json and summary.json hold both, site by site."""
    current = load_warm_start(config.model.compare_with, config, loaded.model, key="model.compare-with")
    candidate = load_warm_start(config.model.warm_start, config, loaded.model)
    scores = coordinator.compare({"candidate": candidate.state, "current": current.state},
                                 pair_id(candidate.sha256, current.sha256), config.model.review_rows)
    comparison = {"models": {name: {"adapter": str(adapter.folder), "sha256": adapter.sha256, **scores[name]}
                             for name, adapter in (("candidate", candidate), ("current", current))},
                  "review": scores["review"],  # each site's expert's verdicts so far: counts only
                  "asked": scores["asked"]}
    rundir.metrics_path.unlink(missing_ok=True)
    rundir.write_json(COMPARISON, comparison)
    rundir.write_summary({"rounds": 0, "comparison": comparison, "base_fingerprint": loaded.fingerprint,
                          "versions": library_versions()})
    write_report(rundir.path)
    log.info("comparison written to %s", rundir.path / COMPARISON)


def check_drift(coordinator: Coordinator, config: cfg.RunConfig, rundir: RunDirectory) -> None:
    """A drift-check run (federation.drift-check): each site's drift figures, and whether retraining is due."""
    answers = coordinator.drift(coordinator.wait_for_sites())
    report = drift_check.assess(answers, config.federation.retrain_after_days)
    rundir.metrics_path.unlink(missing_ok=True)
    rundir.write_json(drift_check.DRIFT_FILE, report)
    rundir.write_summary({"rounds": 0, "drift": report, "versions": library_versions()})
    write_report(rundir.path)
    for line in drift_check.lines(report):
        log.info("%s", line)

