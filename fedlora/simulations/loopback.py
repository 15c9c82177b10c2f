"""A real fedlora deployment on one machine: a coordinator and sites as separate processes.

For the deployment tests and the deployment benchmark. Everything binds
127.0.0.1 on free ports; each site has its own folder, data file and state;
the processes are started with the real commands (`fedlora coordinator start`,
`fedlora site start`, `fedlora run`). Every process started here is killed,
with all its descendants, by `close()`, also when the caller fails.

    python -m fedlora.simulations.loopback run --dir COORDINATOR --out RUN [--set ...]

is `fedlora run` with the test relay that honours a site's `test-fault`
(fedlora.simulations.faults), for the deployment tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedlora.data import synthetic
from fedlora.deploy import cli as deploy_cli
from fedlora.deploy.coordinator_home import init_coordinator
from fedlora.deploy.flwr_cli import call_json
from fedlora.deploy.registry import add_site
from fedlora.deploy.site_home import init_site
from fedlora.flower import FLOWER_ENV
from fedlora.processes import free_ports, kill_tree
from fedlora.simulations.faults import RELAY_APP

LABELS = ",".join(synthetic.LABELS)
# One torch thread per process: here all sites share one machine (a real site has its own), and
# several processes each spinning a thread per core slow everyone down (Ray's simulation does the same).
ENV = {**FLOWER_ENV, "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> list[str]:
    """The `fedlora` command line, run with this interpreter."""
    return [sys.executable, "-m", "fedlora.cli", *args]


def wait_until(condition, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class LoopbackFederation:
    def __init__(self, root: Path, num_sites: int = 3, records: int = 60, node_config: dict[str, str] | None = None,
                 worker: bool = True, proxy: str = "python"):
        """Sites site1..siteN, each with `records` rows of the synthetic corpus (its own share).
        `node_config`: extra TOML lines for a site's [node-config], by site name. `worker`: whether
        sites keep their model loaded in a site worker (False: a cold ClientApp process per message).
        `proxy`: what serves the coordinator's listen address, "python" or "nginx" (coordinator.toml)."""
        self.root = root
        self.worker = worker
        self.env = {**os.environ, **ENV, "FLWR_HOME": str(root / "flwr-home-unused")}
        self.proxy_port, self.superlink_port, *self.runtime_ports = free_ports(3 + num_sites)
        self.coord = root / "coordinator"
        self.sites = [f"site{i + 1}" for i in range(num_sites)]
        self.processes: dict[str, subprocess.Popen] = {}
        self._marks: dict[str, dict[str, int]] = {}
        # The folders are made by the functions behind `fedlora coordinator init`, `fedlora site init`
        # and `fedlora coordinator register-site` (their CLI is tested in test_deploy_tools.py).
        home = init_coordinator(self.coord, [], f"127.0.0.1:{self.proxy_port}", self.superlink_port,
                                proxy=proxy)
        for i, name in enumerate(self.sites):
            data = root / "data" / f"{name}.jsonl"
            data.parent.mkdir(exist_ok=True)
            rows = synthetic.site_records(i, num_sites, records, seed=0)
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            site = init_site(self.site_dir(name), name, data, f"127.0.0.1:{self.proxy_port}", self.ca, epsilon=None,
                             runtime_port=self.runtime_ports[i])
            add_site(home, name, site.private_key.with_name("site.key.pub"))
            settings = site.path / "site.toml"
            text = settings.read_text().replace("worker = true", f"worker = {str(worker).lower()}")
            settings.write_text(text + (node_config or {}).get(name, ""))

    # -- paths ---------------------------------------------------------------
    @property
    def ca(self) -> Path:
        return self.coord / "ca" / "ca.crt"

    def site_dir(self, name: str) -> Path:
        return self.root / name

    def log(self, name: str) -> Path:
        return self.root / f"{name}.out"

    # -- processes -----------------------------------------------------------
    def spawn(self, name: str, *command: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a process (`env`: variables to add to the federation's environment)."""
        with self.log(name).open("a") as out:
            process = subprocess.Popen(command, env={**self.env, **(env or {})}, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        return process

    def start_coordinator(self) -> None:
        log = self.log("coordinator")
        seen = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
        process = self.spawn("coordinator", *cli("coordinator", "start", "--dir", str(self.coord)))
        wait_until(lambda: process.poll() is not None or "coordinator ready" in tail(log, seen),
                   120, "the coordinator to start")
        if process.poll() is not None:
            raise RuntimeError(f"the coordinator exited: {tail(log, seen)[-3000:]}")

    def start_site(self, name: str, wait: bool = True, env: dict[str, str] | None = None) -> None:
        logs = self.site_dir(name) / "logs"
        self._marks[name] = {f: _size(logs / f) for f in ("supernode.log", "worker.log")}
        self.spawn(name, *cli("site", "start", "--dir", str(self.site_dir(name))), env=env)
        if wait:
            self.wait_site(name)

    def wait_site(self, name: str, timeout: float = 180) -> None:
        """Until this start of the site is connected (activated by the SuperLink) and its worker ready:
        the SuperLink's own status may still say "online" for a killed instance."""
        logs = self.site_dir(name) / "logs"

        def fresh(file: str) -> str:
            path = logs / file
            return tail(path, self._marks[name][file])

        wait_until(lambda: "SuperNode ID:" in fresh("supernode.log")
                   and (not self.worker or "site worker ready" in fresh("worker.log")),
                   timeout, f"{name} to connect")

    def kill(self, name: str) -> None:
        """SIGKILL a process group and every descendant (Flower detaches some of its children)."""
        process = self.processes.pop(name, None)
        if process is None:
            return
        kill_tree(process.pid)
        process.wait(timeout=30)

    def close(self) -> None:
        for name in list(self.processes):
            self.kill(name)

    # -- queries -------------------------------------------------------------
    def nodes(self) -> list[dict]:
        return call_json(self.coord / "flwr-home", "supernode", "list").get("nodes", [])

    def runs(self) -> list[dict]:
        return call_json(self.coord / "flwr-home", "ls").get("runs", [])

    def run_command(self, out: Path, *settings: str, resume: bool = False, faulty: bool = False) -> list[str]:
        """`fedlora run` for this coordinator; `faulty`: with the test relay that honours `test-fault`."""
        runner = [sys.executable, "-m", "fedlora.simulations.loopback"] if faulty else cli()
        command = [*runner, "run", "--dir", str(self.coord), "--out", str(out)]
        for setting in settings:
            command += ["--set", setting]
        return command + (["--resume"] if resume else [])


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def tail(path: Path, offset: int) -> str:
    """What a log file gained after `offset` bytes."""
    return path.read_bytes()[offset:].decode(errors="replace") if path.exists() else ""


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    """`fedlora run`, submitting the run with the test relay (faults.relay_app) as the sites' ClientApp."""
    parser = argparse.ArgumentParser(prog="python -m fedlora.simulations.loopback")
    deploy_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    if args.command != "run":
        parser.error("only `run` submits with the test relay")
    return deploy_cli.run_command(args, clientapp=RELAY_APP)


if __name__ == "__main__":
    sys.exit(main())
