"""`fedlora simulate`: run the real ServerApp and ClientApp on Flower's Simulation Engine.

It starts a private SuperLink in simulation mode (Ray backend) on a free
loopback port, submits the fedlora Flower app with `flwr run`, shows one line
of progress per round from the run directory (and a bar, on a terminal:
fedlora.progress), and stops the SuperLink when the run ends. Sites are Ray
actors in separate processes: an update reaches the server only as a
serialized Flower message, exactly as in deployment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from fedlora import config as cfg
from fedlora.flower import FLOWER_ENV
from fedlora.flower_app import CLIENT_APP, write_app
from fedlora.processes import free_ports, stop_tree, wait_for_port
from fedlora.progress import echo, progress, round_line, watch_rounds
from fedlora.simulations import misbehaving
from fedlora.simulations.prepare import prepare


class SimulationFailed(RuntimeError):
    pass


def simulate(config: cfg.RunConfig, out: str | Path, verbose: bool = False, clientapp: str | None = None) -> Path:
    """Run a simulated federation; returns the run directory. `clientapp`: the sites' ClientApp
    component (default: fedlora's, or the one with misbehaving sites the configuration asks for)."""
    out = Path(out).expanduser().resolve()
    config = prepare(config, out)  # everything checkable is checked before the engine starts
    clientapp = clientapp or (misbehaving.APP if misbehaving.misbehaves(config) else CLIENT_APP)
    if not config.output.resume and (out / "summary.json").exists():
        raise SimulationFailed(f"{out} already holds a finished run; choose another --out or pass --resume")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedlora-sim-"))
    app_dir = write_app(work / "app", config, clientapp)
    (port,) = free_ports(1)
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
    if config.simulation.ray_address:  # Flower's Ray backend calls ray.init(), which joins the cluster RAY_ADDRESS names
        env["RAY_ADDRESS"] = config.simulation.ray_address
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
            try:
                wait_for_port("127.0.0.1", port, superlink, what="flower-superlink")
            except RuntimeError as err:
                raise SimulationFailed(f"{err}; see {log_path}") from None
            run_cmd = [str(bin_dir / "flwr"), "run", str(app_dir), "fedlora-sim", "--stream",
                       "--federation-config",
                       f"num-supernodes={fed.num_sites} "
                       f"client-resources-num-cpus={config.simulation.cpus_per_site}"
                       + (f" client-resources-num-gpus={config.simulation.gpus_per_site}"
                          if config.simulation.gpus_per_site else "")]
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
            stop_tree(superlink.pid, timeout=20)  # the SuperLink and what it started (ServerApp, Ray)
            shutil.rmtree(work, ignore_errors=True)
    if not (out / "summary.json").exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise SimulationFailed(f"the simulation ended without a summary; Flower's log ({log_path}) ends with:\n{tail}")
    if verbose:
        print(log_path.read_text(errors="replace"))
    print(f"fedlora simulate: done in {time.perf_counter() - started:.0f}s; adapter in {out / 'adapter'}", flush=True)
    return out
