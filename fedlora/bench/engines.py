"""How a suite runs a whole federation, and how it picks up a run an interrupted bench finished.

`simulate` is `fedlora simulate` (Flower's Simulation Engine, Ray: sites in parallel
processes), what the full suites measure; `in-process` is the real ServerApp and
ClientApp over the in-process Grid (sites in turn, no engine to start), what quick
modes use.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fedlora import config as cfg
from fedlora.simulations.inprocess import run_inprocess
from fedlora.simulations.launcher import simulate

ENGINES = {"simulate": simulate, "in-process": run_inprocess}


def finished_run(engine: str, sets: list[str], rundir: Path) -> Path:
    """A run of `sets` in `rundir`: a finished one (summary.json) is reused, an unfinished one started over."""
    if not (rundir / "summary.json").exists():
        config = cfg.load_config(None, sets)  # a bad setting fails before anything is removed
        shutil.rmtree(rundir, ignore_errors=True)
        ENGINES[engine](config, rundir)
    return rundir
