"""Optional experiment tracking: each metrics row also goes to TensorBoard or MLflow.

`output.tracking` picks the tracker; DIR/metrics.jsonl stays the record and a
tracker only mirrors it, for people who already watch runs in one of these
tools. Numbers only, step = round; a per-site map such as `epsilon_per_site`
becomes one scalar per site (`epsilon_per_site/site-0`).

    tensorboard   event files in DIR/tensorboard (tensorboardX; no TensorFlow):
                  tensorboard --logdir DIR/tensorboard
    mlflow        a local MLflow store in DIR/mlruns: mlflow.db (SQLite, as MLflow now
                  recommends over its file store) with artifacts/ beside it:
                  mlflow ui --backend-store-uri sqlite:///DIR/mlruns/mlflow.db

The packages are optional (`pip install 'fedlora[tracking]'`) and imported only
when a run asks for them; `require` fails at the start of a run when one is missing.
"""

from __future__ import annotations

import importlib
import os
import re
import time
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError

MODULES = {"tensorboard": "tensorboardX", "mlflow": "mlflow"}
INSTALL = "pip install 'fedlora[tracking]'"
EXPERIMENT = "fedlora"


def require(kind: str) -> None:
    """Raise a ConfigError naming the pip extra when the tracker `kind` cannot be imported."""
    module = MODULES.get(kind)
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ConfigError([f"output.tracking = {kind!r} needs the {module} package, which is not installed "
                           f"({err}); install it with {INSTALL}, or set output.tracking = 'none'"]) from None


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row, by tracker name (`round`, the step, left out; maps flattened at any
    depth, e.g. eval_sites/site-0/eval_accuracy; lists and None left out)."""
    out: dict[str, float] = {}

    def walk(name: str, value: Any) -> None:
        if isinstance(value, dict):
            for sub, v in value.items():
                walk(f"{name}/{sub}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[_name(name)] = float(value)

    for key, value in row.items():
        if key != "round":
            walk(key, value)
    return out


def _name(key: str) -> str:
    """A name both trackers accept (MLflow: letters, digits, _ - . space : /)."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def open_tracker(kind: str, run_dir: Path, resumed_after: int | None = None):
    """The tracker `kind` for the run directory, or None for 'none'. `resumed_after`: the
    checkpoint's round when the run resumes (the rounds after it are logged again)."""
    require(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir / "tensorboard", resumed_after)
    if kind == "mlflow":
        return MlflowTracker(run_dir / "mlruns", run_dir, resumed_after)
    return None


class TensorBoardTracker:
    def __init__(self, folder: Path, resumed_after: int | None):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard drops earlier events of this folder from that step on, so the
        # rounds a resumed run logs again, or a fresh run in an old directory, are not shown twice.
        # A suffix of nanoseconds: a writer opened in the same second as another (same name) would
        # truncate its file.
        self.writer = SummaryWriter(str(folder), purge_step=(resumed_after or 0) + 1,
                                    filename_suffix=f".{time.time_ns()}")

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a round is minutes: nothing is lost if the coordinator stops

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, folder: Path, run_dir: Path, resumed_after: int | None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # a hospital's coordinator does not phone home
        from mlflow.tracking import MlflowClient

        folder.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            EXPERIMENT, artifact_location=(folder / "artifacts").as_uri())
        tags = {"fedlora.run_dir": str(run_dir)}
        if resumed_after is not None:
            tags["fedlora.resumed_after_round"] = str(resumed_after)
        name = run_dir.name if resumed_after is None else f"{run_dir.name} (resumed after round {resumed_after})"
        self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def log(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, now = int(row["round"]), int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in scalars(row).items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
