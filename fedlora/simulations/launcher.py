"""`fedlora simulate`: run the real ServerApp and ClientApp on Flower's Simulation Engine.

It starts a private SuperLink in simulation mode (Ray backend) on a free
loopback port, submits the fedlora Flower app with `flwr run`, shows one line
of progress per round from the run directory (and a bar, on a terminal:
fedlora.progress), and stops the SuperLink when the run ends. Sites are Ray
actors in separate processes: an update reaches the server only as a
serialized Flower message, exactly as in deployment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterator

import tomli_w

from fedlora import config as cfg
from fedlora.progress import echo, progress
from fedlora.server.tracking import require as require_tracking

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


class SimulationFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_app_pyproject(config: cfg.RunConfig, clientapp: str = "fedlora.client.app:app") -> str:
    """A Flower app whose components are the installed fedlora apps and whose
    run-config defaults are this run's resolved configuration. (`fedlora run`
    deploys the relay ClientApp, fedlora.client.relay:app, which calls the same one.)"""
    doc = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "fedlora-run", "version": "0.1.0", "license": {"file": "LICENSE"},
                    "dependencies": ["flwr[simulation]>=1.42.0,<1.43"]},
        "tool": {"flwr": {"app": {
            "publisher": "fedlora", "fab-format-version": 1, "flwr-version-target": "1.42.0",
            "components": {"serverapp": "fedlora.server.app:app", "clientapp": clientapp},
            "config": config.to_nested(),
        }}},
    }
    return tomli_w.dumps(doc)


def infer_labels(config: cfg.RunConfig) -> cfg.RunConfig:
    """Fill task.labels from the data when a classification run leaves it empty."""
    if config.task.type != "classification" or config.label_names:
        return config
    from fedlora.data import synthetic
    from fedlora.data.readers import read_rows, site_files

    if not config.data.path:
        labels = synthetic.LABELS
    else:
        path = Path(config.data.path)
        files = list(site_files(path).values()) if path.is_dir() else [path]
        column = config.task.label_column
        seen: set[str] = set()

        def check(row: dict) -> str | None:
            return None if row.get(column) not in (None, "") else f"column {column!r} missing"

        for f in files:
            seen.update(str(r[column]) for r in read_rows(f, check, config.data.skip_bad_rows).rows)
        labels = sorted(seen)
    return cfg.from_nested(config.to_nested(), {"task.labels": ",".join(labels)})


def round_line(row: dict, rounds: int) -> str:
    """The one line of progress printed for a round's metrics row."""
    parts = [f"round {row['round']}/{rounds}"]
    for key in ("train_loss", "eval_loss", "eval_accuracy", "eval_macro_f1", "test_accuracy",
                "test_macro_f1", "eval_perplexity", "epsilon"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"{row['round_seconds']:.1f}s")
    return "  " + " · ".join(parts)


def _written_rows(rundir: Path) -> list[dict]:
    """The complete rows of rundir/metrics.jsonl (a line still being appended is left for later)."""
    metrics = rundir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().split("\n")[:-1] if line.strip()]


def watch_rounds(rundir: Path, running: Callable[[], bool], poll: float = 1.0) -> Iterator[dict]:
    """Each row of rundir/metrics.jsonl as the coordinator writes it, while `running()` holds,
    then the rows written before it stopped."""
    shown = 0
    while True:
        still = running()
        rows = _written_rows(rundir)
        shown = min(shown, len(rows))  # a resumed run drops the rows after its checkpoint
        yield from rows[shown:]
        shown = len(rows)
        if not still:
            return
        time.sleep(poll)


def simulate(config: cfg.RunConfig, out: str | Path, verbose: bool = False) -> Path:
    """Run a simulated federation; returns the run directory."""
    out = Path(out).expanduser().resolve()
    config = infer_labels(cfg.from_nested(config.to_nested(), {"output.dir": str(out)}))
    require_tracking(config.output.tracking)  # here, not in Flower's log after the engine started
    if not config.output.resume and (out / "summary.json").exists():
        raise SimulationFailed(f"{out} already holds a finished run; choose another --out or pass --resume")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedlora-sim-"))
    app_dir = work / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(flower_app_pyproject(config))
    (app_dir / "LICENSE").write_text("Apache-2.0\n")
    port = free_port()
    flwr_home = work / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(textwrap.dedent(f"""\
        [superlink]
        default = "fedlora-sim"

        [superlink.fedlora-sim]
        address = "127.0.0.1:{port}"
        insecure = true
        """))
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home)}
    log_path = out / "flower.log"
    bin_dir = Path(sys.executable).parent
    superlink_cmd = [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                     "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"]
    fed = config.federation
    print(f"fedlora simulate: {fed.num_sites} sites × {fed.rounds} rounds, model {config.model.name}, "
          f"strategy {config.strategy.name} → {out}", flush=True)
    started = time.perf_counter()
    with log_path.open("a") as log_file:
        superlink = subprocess.Popen(superlink_cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            _wait_for_port(port, superlink, log_path)
            run_cmd = [str(bin_dir / "flwr"), "run", str(app_dir), "fedlora-sim", "--stream",
                       "--federation-config",
                       f"num-supernodes={fed.num_sites} "
                       f"client-resources-num-cpus={config.simulation.cpus_per_site}"]
            runner = subprocess.Popen(run_cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                      start_new_session=True)

            def running() -> bool:
                if runner.poll() is not None:
                    return False
                if superlink.poll() is not None:
                    runner.kill()
                    return False
                return True

            for row in progress(watch_rounds(out, running), "rounds", total=fed.rounds, unit="round"):
                echo(round_line(row, fed.rounds))
        finally:
            _stop(superlink)
            shutil.rmtree(work, ignore_errors=True)
    if not (out / "summary.json").exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise SimulationFailed(f"the simulation ended without a summary; Flower's log ({log_path}) ends with:\n{tail}")
    if verbose:
        print(log_path.read_text(errors="replace"))
    print(f"fedlora simulate: done in {time.perf_counter() - started:.0f}s; adapter in {out / 'adapter'}", flush=True)
    return out


def _wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationFailed(f"flower-superlink exited with code {process.returncode}; see {log_path}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SimulationFailed(f"flower-superlink did not open port {port} within {timeout:.0f}s; see {log_path}")


def _stop(process: subprocess.Popen) -> None:
    """Stop the SuperLink and everything it started (ServerApp, Ray)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
