"""`fedlora run`: submit a training run to the coordinator's SuperLink and follow it.

Works on the coordinator host only: the SuperLink's Control API listens on
127.0.0.1 (fedlora.deploy.coordinator). The run's configuration is the resolved
fedlora configuration, shipped as the Flower app's run-config defaults; the
sites' ClientApp is the relay (fedlora.deploy.relay), which answers through the
site's worker process when there is one. Progress is printed one line per
round from the run directory, which the ServerApp writes on this host.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from fedlora import config as cfg
from fedlora.data.readers import read_rows
from fedlora.deploy.coordinator_home import CoordinatorHome
from fedlora.deploy.flwr_cli import (
    CONNECTION,
    LIVE_STATUSES,
    FlowerCommandFailed,
    call_json,
    flower_env,
    flwr_binary,
    run_status,
)
from fedlora.deploy.registry import superlink_running
from fedlora.flower_app import write_app
from fedlora.model_sources import check_available
from fedlora.processes import stop_tree
from fedlora.progress import echo, progress, round_line, watch_rounds
from fedlora.server.rundir import FAILED
from fedlora.server.tracking import require as require_tracking
from fedlora.server.warm_start import WarmStartError, adapter_folder
from fedlora.tasks import build_task

RELAY_CLIENTAPP = "fedlora.deploy.relay:app"
RUN_RECORD = "flower-run.json"  # the Flower run id that writes this run directory
STARTED = re.compile(r"Successfully started run (\d+)")
STATUS_EVERY = 10.0  # seconds between two status queries once the log stream has ended
UNANSWERED_LIMIT = 6  # status queries in a row without an answer before the run counts as lost


class RunFailed(RuntimeError):
    pass


def resolve(home: CoordinatorHome, config: cfg.RunConfig, out: Path | None, resume: bool) -> tuple[cfg.RunConfig, Path]:
    """The configuration to submit, with an absolute output.dir on this host."""
    if out is None:
        out = home.runs / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = Path(out).expanduser().resolve()
    overrides = {"output.dir": str(out), "output.resume": resume}
    if not config.privacy.ledger_heads:  # one record across runs: a site's ledger is checked from run to run
        overrides["privacy.ledger-heads"] = str(home.ledger_heads)
    # The ServerApp's working directory is not this shell's: its paths are made absolute here.
    adapters = {"model.warm-start": config.model.warm_start, "model.compare-with": config.model.compare_with}
    for key, path in adapters.items():
        if path and not resume:
            try:
                overrides[key] = str(adapter_folder(path, key).resolve())  # a registry's `current` is pinned
            except WarmStartError as err:
                raise cfg.ConfigError([str(err)]) from None
    if config.output.registry:
        overrides["output.registry"] = str(Path(config.output.registry).expanduser().resolve())
    elif not config.model.compare_with:  # every finished training run becomes a version (not current)
        overrides["output.registry"] = str(home.models)
    config = cfg.from_nested(config.to_nested(), overrides)
    if config.task.type == "classification" and not config.task.labels:
        raise cfg.ConfigError(["task.labels: required for a deployed classification run (the coordinator "
                               "does not see the sites' data); list every label, in the same order at every site"])
    # The ServerApp runs on this host: its model, central test set and tracker are checked before submitting.
    require_tracking(config.output.tracking)
    check_available(config.model.name, config.model.allow_download)
    if config.data.test_path:
        read_rows(config.data.test_path, build_task(config).check_row, config.data.skip_bad_rows)
    if not resume and (out / "summary.json").exists():
        raise RunFailed(f"{out} already holds a finished run; choose another --out or pass --resume")
    return config, out


def _stop_previous(home: CoordinatorHome, out: Path) -> None:
    """On resume: the Flower run that wrote this directory must not run twice."""
    record = out / RUN_RECORD
    if not record.exists():
        return
    run_id = json.loads(record.read_text())["run_id"]
    try:
        runs = call_json(home.flwr_home, "ls", "--run-id", str(run_id)).get("runs", [])
        if runs and not str(runs[0].get("status", "")).startswith("finished"):
            call_json(home.flwr_home, "stop", str(run_id))
            print(f"fedlora run: stopped the previous Flower run {run_id} of {out}", flush=True)
    except FlowerCommandFailed:
        pass  # unknown to this SuperLink (e.g. a fresh database): nothing to stop


def submit(home: CoordinatorHome, config: cfg.RunConfig, out: Path | None = None, resume: bool = False,
           clientapp: str = RELAY_CLIENTAPP) -> Path:
    """Submit a run and follow it until it ends; returns the run directory. `clientapp`: the
    ClientApp component the sites run (tests pass one that injects faults)."""
    if not superlink_running(home):
        raise RunFailed(f"the coordinator is not running (nothing on 127.0.0.1:{home.superlink_port}); "
                        f"start it with `fedlora coordinator start {home.path}`")
    config, out = resolve(home, config, out, resume)
    out.mkdir(parents=True, exist_ok=True)
    (out / FAILED).unlink(missing_ok=True)  # a previous attempt's reason is not this one's
    if resume:
        _stop_previous(home, out)
    work = Path(tempfile.mkdtemp(prefix="fedlora-run-"))
    try:
        write_app(work, config, clientapp)
        fed = config.federation
        print(f"fedlora run: {fed.rounds} rounds, model {config.model.name}, strategy {config.strategy.name}, "
              f"min {fed.min_sites} sites → {out}", flush=True)
        return _follow(home, work, out, fed.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _follow(home: CoordinatorHome, app_dir: Path, out: Path, rounds: int) -> Path:
    log_path = out / "flower.log"
    command = [flwr_binary(), "run", str(app_dir), CONNECTION, "--stream"]
    started, run_id = time.perf_counter(), None
    offset = log_path.stat().st_size if log_path.exists() else 0  # a resumed run's log holds the previous id
    with log_path.open("a") as log_file:
        runner = subprocess.Popen(command, env=flower_env(home.flwr_home), stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)

        goes_on = StatusWatch(home, out)

        def running() -> bool:
            nonlocal run_id
            run_id = run_id or _run_id(log_path, out, offset)
            return runner.poll() is None or goes_on(run_id)

        try:
            for row in progress(watch_rounds(out, running), "rounds", total=rounds, unit="round"):
                echo(round_line(row, rounds))
        except KeyboardInterrupt:
            run_id = run_id or _run_id(log_path, out, offset)
            print(f"\nfedlora run: stopped following; run {run_id} goes on at the coordinator. Stop it with "
                  f"`FLWR_HOME={home.flwr_home} flwr stop {run_id} {CONNECTION}`", flush=True)
            raise
        finally:
            stop_tree(runner.pid, timeout=5)
    _run_id(log_path, out, offset)
    if not (out / "summary.json").exists():
        raise RunFailed(_why_it_stopped(out, log_path))
    print(f"fedlora run: done in {time.perf_counter() - started:.0f}s; adapter in {out / 'adapter'}", flush=True)
    return out


class StatusWatch:
    """Once `flwr run --stream` has ended: whether the run still goes on at the coordinator. The log
    stream can break while the run goes on (Flower's Control API fails under load: "database is
    locked"); the run's own status decides then, asked at most every STATUS_EVERY seconds. The same
    API may fail to answer for a while: the run counts as going on until UNANSWERED_LIMIT queries in a
    row went unanswered."""

    def __init__(self, home: CoordinatorHome, out: Path, every: float = STATUS_EVERY):
        self.home, self.out, self.every = home, out, every
        self.asked_at: float | None = None
        self.answer = False
        self.unanswered = 0

    def __call__(self, run_id: str | None) -> bool:
        if run_id is None or (self.out / "summary.json").exists():
            return False
        now = time.monotonic()
        if self.asked_at is not None and now - self.asked_at < self.every:
            return self.answer
        try:
            status = run_status(self.home.flwr_home, run_id)
            self.unanswered = 0
        except (FlowerCommandFailed, subprocess.TimeoutExpired):
            self.unanswered += 1
            status = "running" if self.unanswered < UNANSWERED_LIMIT else "unknown"
        if self.asked_at is None and status in LIVE_STATUSES:
            print(f"fedlora run: the log stream from the coordinator ended, but run {run_id} is not finished "
                  "there; following its run directory", flush=True)
        self.asked_at, self.answer = now, status in LIVE_STATUSES
        return self.answer


LOW_DISK = 64 * 2**20  # bytes free below which a run directory's disk counts as full


def _why_it_stopped(out: Path, log_path: Path) -> str:
    """What to tell the operator of a run that ended without a summary."""
    resume = f"`fedlora run --resume --out {out}` continues it from its last checkpoint"
    failed = out / FAILED
    if failed.exists():
        reason = json.loads(failed.read_text()).get("error", "unknown")
        return f"the run failed: {reason}. Once that is fixed, {resume}"
    free = shutil.disk_usage(out).free
    if free < LOW_DISK:
        return (f"the run stopped and the disk of {out} is full ({free} bytes free: No space left on device?). "
                f"Free space there, then {resume}")
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:]) if log_path.exists() else ""
    return f"the run ended without a summary (if the coordinator stopped, {resume}); {log_path} ends with:\n{tail}"


def _run_id(log_path: Path, out: Path, offset: int = 0) -> str | None:
    """The run id `flwr run` printed after byte `offset` of its log; recorded in the run directory for --resume."""
    found = STARTED.findall(log_path.read_bytes()[offset:].decode(errors="replace")) if log_path.exists() else []
    if not found:
        return None
    record = out / RUN_RECORD
    if not record.exists() or json.loads(record.read_text())["run_id"] != found[-1]:
        record.write_text(json.dumps({"run_id": found[-1], "submitted": time.time()}))
    return found[-1]
