"""`fedlora coordinator start`: the SuperLink on loopback, the Fleet-only proxy in front.

    sites ──TLS──▶ listen (proxy: POST /v1/fleet/* only) ──TLS──▶ 127.0.0.1:superlink-port
                                                                   ▲ SuperLink: Fleet + Control + Runtime
    `fedlora run`, `flwr` on this host ──TLS (loopback)────────────┘

The SuperLink runs with TLS (Flower requires it for site authentication), site
authentication on (only registered keys connect; sites cannot self-register),
its state in a database on disk (registrations and runs survive a restart) and
runtime dependency installation off (no `uv sync`, no network at run time).
This process supervises both: it stops the SuperLink when it is stopped, and
stops when the SuperLink dies. With `proxy = "nginx"` in coordinator.toml, nginx serves
`listen` instead of the Python proxy (deploy/nginx.py), as a third supervised child: the
coordinator stops when either the SuperLink or nginx dies.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from fedlora.deploy import fleet_proxy, nginx, registry
from fedlora.deploy.coordinator_home import CoordinatorError, CoordinatorHome, split_address
from fedlora.deploy.permissions import make_private
from fedlora.deploy.flwr_cli import FlowerCommandFailed, call_json, flower_env
from fedlora.processes import (
    end_previous,
    mark_supervisor,
    port_open,
    start_child,
    stop_leftovers,
    stop_on_sigterm,
    stop_tree,
    wait_for_port,
    write_pid_file,
)

log = logging.getLogger(__name__)

ORPHAN_STATUSES = ("starting", "running")  # their ServerApp died with the previous SuperLink


def superlink_command(home: CoordinatorHome) -> list[str]:
    tls = home.tls
    return [str(Path(sys.executable).parent / "flower-superlink"),
            "--ssl-certfile", str(tls.server_cert), "--ssl-keyfile", str(tls.server_key),
            "--ssl-ca-certfile", str(tls.ca_cert),
            "--enable-supernode-auth",
            "--database", str(home.database),
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(home.superlink_port)]  # never on the network


def stop_orphaned_runs(home: CoordinatorHome) -> list[str]:
    """Runs the database still marks running were cut off by a restart; stop them so
    sites drop their messages. `fedlora run --resume` continues such a run."""
    stopped = []
    for run in call_json(home.flwr_home, "ls").get("runs", []):
        if run.get("status") in ORPHAN_STATUSES:
            try:
                call_json(home.flwr_home, "stop", str(run["run-id"]))
                stopped.append(str(run["run-id"]))
            except FlowerCommandFailed as err:
                log.warning("could not stop orphaned run %s: %s", run["run-id"], err)
    return stopped


def _check_ready(home: CoordinatorHome) -> None:
    missing = [p for p in (home.tls.ca_cert, home.tls.server_cert, home.tls.server_key) if not p.exists()]
    if missing:
        raise CoordinatorError(f"missing TLS files: {', '.join(map(str, missing))}")


def start(home: CoordinatorHome) -> int:
    """Run the coordinator in the foreground until SIGINT/SIGTERM; returns an exit code."""
    _check_ready(home)
    stop_on_sigterm()  # uvicorn handles SIGTERM itself while the proxy serves
    listen_host, listen_port = split_address(home.listen)
    end_previous(home.pid_file, home.path, "coordinator")
    if stale_nginx := nginx.end_leftover(home):  # nginx rewrites its environment: found by its pid file
        log.warning("stopped an nginx left running by a coordinator that did not stop cleanly (pids %s)",
                    ", ".join(map(str, stale_nginx)))
    if port_open("127.0.0.1", home.superlink_port):
        raise CoordinatorError(f"127.0.0.1:{home.superlink_port} is already in use (another coordinator?); "
                               "set superlink-port in coordinator.toml")
    make_private(home.path / "state", home.database.parent, home.logs, home.runs, home.models, home.flwr_home)
    home.logs.mkdir(parents=True, exist_ok=True)
    nginx_command = nginx.prepare(home) if home.proxy == "nginx" else None  # fails here, before anything runs
    home.database.parent.mkdir(parents=True, exist_ok=True)
    write_pid_file(home.pid_file)
    mark_supervisor(home.path)  # every process started from here on carries the mark (see processes.py)
    with (home.logs / "superlink.log").open("a") as superlink_log:
        superlink = start_child(superlink_command(home), superlink_log, env=flower_env(home.flwr_home),
                                cwd=home.path)
        try:
            wait_for_port("127.0.0.1", home.superlink_port, superlink, what="flower-superlink")
            registered, problems = registry.sync(home)
            for line in registered:
                log.info("%s", line)
            for line in problems:
                log.warning("%s", line)
            for run_id in stop_orphaned_runs(home):
                log.info("stopped run %s, cut off by the previous shutdown (resume it with "
                         "`fedlora run --resume --out <its run directory>`)", run_id)
            log.info("coordinator ready%s: sites connect to %s (Fleet API only); the SuperLink listens on "
                     "127.0.0.1:%d; logs in %s", f" ({len(problems)} site key(s) not registered: see above)"
                     if problems else "", home.listen, home.superlink_port, home.logs)
            if nginx_command is not None:
                if not nginx.serve(nginx_command, home, keep_running=lambda: superlink.poll() is None):
                    return 1  # nginx died (logged with its log's path)
            else:
                fleet_proxy.serve(listen_host, listen_port, f"https://127.0.0.1:{home.superlink_port}",
                                  home.tls.server_cert, home.tls.server_key, home.tls.ca_cert,
                                  keep_running=lambda: superlink.poll() is None, log_file=home.logs / "proxy.log")
            if superlink.poll() is not None:
                log.error("flower-superlink exited with code %s; see %s", superlink.returncode,
                          home.logs / "superlink.log")
                return 1
            return 0
        except KeyboardInterrupt:
            return 0
        finally:
            stop_tree(superlink.pid)
            stop_leftovers(home.path)  # the SuperExec the SuperLink detached, ServerApps it orphaned
            home.pid_file.unlink(missing_ok=True)
            log.info("coordinator stopped")
