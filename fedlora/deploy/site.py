"""`fedlora site start`: the site worker and Flower's SuperNode, supervised together.

The SuperNode connects out to the coordinator over TLS, verifying it against
the consortium CA, and authenticates with the site's private key (it signs a
timestamp per request; the SuperLink checks it against the registered public
key). Nothing listens on the network at the site: the SuperNode's ClientApp
API and the worker's socket are local. Runtime dependency installation stays
off (Flower's default at a SuperNode).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import tomli_w

from fedlora.deploy.session import end_stale_session, remember_node_id
from fedlora.deploy.site_home import SiteHome
from fedlora.flower import FLOWER_ENV
from fedlora.processes import start_child, stop_on_sigterm, stop_tree, write_pid_file

log = logging.getLogger(__name__)

REFUSED = 305           # flower-supernode's exit code when the SuperLink does not activate it
ACTIVATION_WINDOW = 75  # seconds: a crashed session's heartbeat window (2 x 30 s) and some margin


def node_config_file(home: SiteHome) -> Path:
    """The node configuration as a TOML file (Flower reads `--node-config FILE.toml`): no quoting issues."""
    path = home.state / "node-config.toml"
    path.write_text(tomli_w.dumps(home.flower_node_config()))
    return path


def supernode_command(home: SiteHome) -> list[str]:
    return [str(Path(sys.executable).parent / "flower-supernode"),
            "--superlink", home.superlink,
            "--root-certificates", str(home.root_certificates),
            "--auth-supernode-private-key", str(home.private_key),
            "--node-config", str(node_config_file(home)),
            "--host", "127.0.0.1", "--port", str(home.runtime_port)]


def worker_command(home: SiteHome, parent_pid: int) -> list[str]:
    return [sys.executable, "-m", "fedlora.deploy.worker", "--socket", str(home.state / "worker.sock"),
            "--parent-pid", str(parent_pid)]


def _check(home: SiteHome) -> None:
    problems = [f"{p}: no such file" for p in (home.root_certificates, home.private_key, home.data_path)
                if not p.is_file()]
    if problems:
        raise FileNotFoundError("; ".join(problems))


def start(home: SiteHome, env: dict[str, str] | None = None) -> int:
    """Run the site in the foreground until SIGINT/SIGTERM or the SuperNode exits; returns its exit code."""
    _check(home)
    stop_on_sigterm()
    home.state.mkdir(parents=True, exist_ok=True)
    home.logs.mkdir(parents=True, exist_ok=True)
    write_pid_file(home.pid_file)
    env = {**(env or os.environ), **FLOWER_ENV}
    node_log_path = home.logs / "supernode.log"
    children: list = []
    try:
        with node_log_path.open("a") as node_log, (home.logs / "worker.log").open("a") as worker_log:
            worker = None
            if home.worker:
                worker = start_child(worker_command(home, os.getpid()), worker_log, env=env)
                children.append(worker)
            end_stale_session(home)  # a crashed previous start would block this one for a minute
            refused_since = None
            while True:
                offset = node_log_path.stat().st_size
                supernode = start_child(supernode_command(home), node_log, env=env)
                children.append(supernode)
                log.info("site %s: connecting to %s; logs in %s", home.name, home.superlink, home.logs)
                node_id = None
                while supernode.poll() is None:
                    node_id = node_id or remember_node_id(home, node_log_path, offset)
                    if node_id is not None:
                        refused_since = None
                    if worker is not None and worker.poll() is not None:
                        log.warning("site worker exited (code %s); restarting it (messages run in cold "
                                    "ClientApp processes meanwhile)", worker.returncode)
                        children.remove(worker)
                        worker = start_child(worker_command(home, os.getpid()), worker_log, env=env)
                        children.append(worker)
                    time.sleep(1.0)
                children.remove(supernode)
                refused_since = refused_since or time.monotonic()
                if supernode.returncode != REFUSED or time.monotonic() - refused_since > ACTIVATION_WINDOW:
                    break
                log.warning("the coordinator refused to activate this site: its key is not registered, or its "
                            "previous session is still open (up to %d s after a crash); retrying",
                            ACTIVATION_WINDOW)
                time.sleep(5.0)
                end_stale_session(home)
            log.error("the SuperNode exited with code %s; see %s", supernode.returncode, node_log_path)
            return supernode.returncode or 1
    except KeyboardInterrupt:
        return 0
    finally:
        for child in children:
            stop_tree(child.pid)
        home.pid_file.unlink(missing_ok=True)
        log.info("site %s stopped", home.name)
