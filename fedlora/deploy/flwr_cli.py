"""Calls to Flower's `flwr` command against the coordinator's own SuperLink.

The connection (`fedlora`, in `<coordinator>/flwr-home/config.toml`) points at
the SuperLink's loopback address with the coordinator's CA: the Control API is
only reachable from the coordinator host, so these calls work only there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedlora.flower import FLOWER_ENV

CONNECTION = "fedlora"


class FlowerCommandFailed(RuntimeError):
    pass


def flwr_binary() -> str:
    return str(Path(sys.executable).parent / "flwr")


def flower_env(flwr_home: Path) -> dict[str, str]:
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home)}


def write_connection(flwr_home: Path, port: int, ca_cert: Path) -> None:
    """The `fedlora` connection: the SuperLink on 127.0.0.1:port over TLS, trusting only our CA."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        "# Written by fedlora: the coordinator's SuperLink, reachable on loopback only.\n"
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{Path(ca_cert).resolve()}"\n')


def call_json(flwr_home: Path, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run `flwr ARGS... fedlora --format json` and return its JSON; raises with Flower's message."""
    command = [flwr_binary(), *args, CONNECTION, "--format", "json"]
    done = subprocess.run(command, env=flower_env(flwr_home), capture_output=True, text=True, timeout=timeout)
    try:
        reply = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        raise FlowerCommandFailed(f"`flwr {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()[-500:]}") \
            from None
    if not reply.get("success", False):
        raise FlowerCommandFailed(f"`flwr {' '.join(args)}`: {reply.get('error-message', reply)}".strip())
    return reply


LIVE_STATUSES = ("pending", "starting", "running")  # a run's Flower status before it finishes


def run_status(flwr_home: Path, run_id: str) -> str:
    """The coordinator's status of one run (`flwr ls --run-id`): pending, starting, running, or
    finished:<how>; raises FlowerCommandFailed when Flower cannot say."""
    runs = call_json(flwr_home, "ls", "--run-id", str(run_id)).get("runs", [])
    if not runs:
        raise FlowerCommandFailed(f"the coordinator knows no run {run_id}")
    return str(runs[0].get("status", ""))
