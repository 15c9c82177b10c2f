"""`fedlora simulate` on an existing Ray cluster (simulation.ray-address): a head node and a second
worker node started with `ray start` on loopback, as an operator starts them on two machines.

The head offers no CPU, so Flower's Ray backend can place the simulated sites only on the worker node:
the run finishing, with the sites' actors in the cluster's own logs, shows the sites ran on the cluster
and not in a private Ray instance of the launcher's."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fedlora import config as cfg
from fedlora.cli import main as fedlora_main
from fedlora.processes import free_ports, stop_tree, wait_for_port

RAY = shutil.which("ray")


def _ray_start(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("w") as out:
        return subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                 *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _nodes(address: str) -> int:
    done = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True, timeout=60)
    return done.stdout.count(" node_")


@pytest.fixture(scope="module")
def cluster():
    if RAY is None:
        pytest.fail("the `ray` command is missing (it comes with flwr[simulation])")
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    head = _ray_start("--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                      f"--temp-dir={temp}", log=temp / "head.log")
    worker = None
    try:
        wait_for_port("127.0.0.1", port, head, timeout=120, what="ray head")
        worker = _ray_start(f"--address={address}", "--num-cpus=2", log=temp / "worker.log")
        deadline = time.monotonic() + 120
        while _nodes(address) < 2:
            assert worker.poll() is None and time.monotonic() < deadline, (temp / "worker.log").read_text()[-2000:]
            time.sleep(1)
        yield address, temp
    finally:
        for process in (worker, head):
            if process is not None:
                stop_tree(process.pid, timeout=20)
        shutil.rmtree(temp, ignore_errors=True)


def test_simulate_runs_its_sites_on_an_existing_two_node_ray_cluster(cluster, tmp_path, capsys):
    address, temp = cluster
    assert _nodes(address) == 2
    code = fedlora_main(["simulate", "--out", str(tmp_path / "run"), "--set", "model.name=tiny-bert",
                         "--set", "model.max-length=32", "--set", "federation.num-sites=2",
                         "--set", "federation.rounds=1", "--set", "data.records-per-site=20",
                         "--set", "train.local-steps=1", "--set", f"simulation.ray-address={address}"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "summary.json").is_file()
    actors = [p for p in (temp / "session_latest" / "logs").glob("worker-*") if "ClientAppActor" in p.read_text(errors="replace")]
    assert actors, "no site ran in the cluster"  # the head has no CPU: they ran on the worker node


def test_a_ray_address_must_be_host_and_port():
    with pytest.raises(cfg.ConfigError, match="simulation.ray-address"):
        cfg.load_config(None, ["simulation.ray-address=nowhere"])
