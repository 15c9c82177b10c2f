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
import re
import sys
import time
from pathlib import Path

import tomli_w

from fedlora.deploy.keys import fingerprint
from fedlora.deploy.permissions import make_private
from fedlora.deploy.session import end_stale_session, key_accepted, remember_node_id
from fedlora.deploy.site_home import SiteHome
from fedlora.deploy.systemd import SITE_NOT_ACCEPTED
from fedlora.flower import FLOWER_ENV
from fedlora.processes import (
    SUPERVISOR_MARK,
    end_previous,
    mark_supervisor,
    start_child,
    stop_leftovers,
    stop_on_sigterm,
    stop_tree,
    write_pid_file,
)

log = logging.getLogger(__name__)

REFUSED = 305           # Flower's exit code when the SuperLink does not activate a SuperNode
FLOWER_EXIT_CODE = re.compile(rb"Exit Code: (\d+)")  # the process exits 1; the log says which error
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


def worker_socket(home: SiteHome) -> Path:
    return home.state / "worker.sock"


def worker_command(home: SiteHome, parent_pid: int) -> list[str]:
    return [sys.executable, "-m", "fedlora.deploy.worker", "--socket", str(worker_socket(home)),
            "--parent-pid", str(parent_pid)]


def flower_exit_code(node_log: Path, offset: int, returncode: int) -> int:
    """The SuperNode's Flower exit code (e.g. 305, refused), from what it logged after `offset`;
    its process exit status when it logged none (0, or a signal)."""
    found = FLOWER_EXIT_CODE.findall(node_log.read_bytes()[offset:]) if node_log.exists() else []
    return int(found[-1]) if found and returncode == 1 else returncode


def _exit_code(home: SiteHome, code: int, was_connected: bool, node_log: Path) -> int:
    """Say why the SuperNode stopped, in the site's words, and choose the command's exit code."""
    key = fingerprint(home.private_key.with_name(home.private_key.name + ".pub"))
    if code == REFUSED:
        log.error("the coordinator does not accept this site's key (%s): it is not registered there, was "
                  "revoked, or is another key than the one registered. Send keys/site.key.pub to the "
                  "coordinator and compare this fingerprint with theirs", key)
        return SITE_NOT_ACCEPTED
    # A connected SuperNode also ends by itself, with status 0, when its node is unregistered, and when
    # the coordinator answers with an error it does not retry: ask which.
    if code == 0 and was_connected and key_accepted(home) is False:
        log.error("the coordinator ended this site's session and no longer accepts its key (%s): it was "
                  "unregistered or revoked there. Ask the consortium's coordinator; a revoked key is never "
                  "accepted again, so a returning site makes a new key pair", key)
        return SITE_NOT_ACCEPTED
    log.error("the SuperNode exited with code %s; see %s", code, node_log)
    return code or 1


def _check(home: SiteHome) -> None:
    problems = [f"{p}: no such file" for p in (home.root_certificates, home.private_key, home.data_path)
                if not p.is_file()]
    if problems:
        raise FileNotFoundError("; ".join(problems))


def start(home: SiteHome, env: dict[str, str] | None = None) -> int:
    """Run the site in the foreground until SIGINT/SIGTERM or the SuperNode exits; returns its exit code."""
    _check(home)
    stop_on_sigterm()
    end_previous(home.pid_file, home.path, "site")
    make_private(home.state, home.logs, home.path / "keys")
    home.state.mkdir(parents=True, exist_ok=True)
    home.logs.mkdir(parents=True, exist_ok=True)
    write_pid_file(home.pid_file)
    mark_supervisor(home.path)
    env = {**(env or os.environ), **FLOWER_ENV, SUPERVISOR_MARK: os.environ[SUPERVISOR_MARK]}
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
                code = flower_exit_code(node_log_path, offset, supernode.returncode)
                refused_since = refused_since or time.monotonic()
                if code != REFUSED or time.monotonic() - refused_since > ACTIVATION_WINDOW:
                    break
                log.warning("the coordinator refused to activate this site: its key is not registered, or its "
                            "previous session is still open (up to %d s after a crash); retrying",
                            ACTIVATION_WINDOW)
                time.sleep(5.0)
                end_stale_session(home)
            return _exit_code(home, code, node_id is not None, node_log_path)
    except KeyboardInterrupt:
        return 0
    finally:
        for child in children:
            stop_tree(child.pid)
        left = stop_leftovers(home.path)  # e.g. a ClientApp orphaned by a SuperNode crash
        if left:
            log.info("stopped %d process(es) the SuperNode left behind (pids %s)", len(left), ", ".join(map(str, left)))
        worker_socket(home).unlink(missing_ok=True)
        home.pid_file.unlink(missing_ok=True)
        log.info("site %s stopped", home.name)
