"""The run directory: a stable contract that users, tests and tools read.

    adapter/        final global adapter, PEFT format
    metrics.jsonl   one JSON object per round
    summary.json    final figures, totals, parameter counts, versions
    config.toml     the resolved configuration
    tensorboard/, mlruns/  with output.tracking: the metrics rows mirrored to a tracker
    checkpoints/    what a restarted server needs to resume
    predictions.jsonl  the final adapter's predictions on the central test set
    failed.json     why the run stopped early, when it did (removed when it is resumed)
    comparison.json an evaluation-only run (model.compare-with): two adapters scored at every site
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedlora.server import tracking

State = dict[str, np.ndarray]
log = logging.getLogger(__name__)


class RunDirectoryError(RuntimeError):
    """The run directory could not be written (a full disk, a lost mount, a permission)."""


@contextmanager
def _writing(path: Path, partial: Path | None = None):
    """Turn a failed write into a RunDirectoryError that names the path and the system's error
    ("No space left on device"), removing the `partial` file or folder it leaves."""
    try:
        yield
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
        if partial is not None:
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)
        raise RunDirectoryError(f"cannot write {path}: {getattr(err, 'strerror', None) or err}") from err


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with _writing(path, partial=tmp):
        tmp.write_text(text)
        os.replace(tmp, path)


FAILED = "failed.json"  # why a run stopped before its summary: {"error", "rounds"}
CHECKPOINT_FORMAT = 2  # 2: one composed coordinator state (fedlora.server.pipeline.Coordinator.state_dict)


class CheckpointError(RuntimeError):
    """A checkpoint this version cannot resume."""


@dataclass
class Checkpoint:
    round: int
    global_state: State
    state: dict[str, Any]  # the coordinator's state_dict(): numpy arrays anywhere inside


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.tracking = "none"  # output.tracking: where append_metrics mirrors each row
        self._tracker = None  # opened at the first row, once a resume (truncate_metrics) is known
        self._resumed_after: int | None = None

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, toml_text: str) -> None:
        _atomic_write(self.path / "config.toml", toml_text)

    def start_tracking(self, kind: str) -> None:
        """Mirror each metrics row to the tracker `kind` (fedlora.server.tracking); raises a
        ConfigError naming the pip extra now, at the start of the run, if its package is missing."""
        tracking.require(kind)
        self.tracking = kind

    def append_metrics(self, row: dict[str, Any]) -> None:
        with _writing(self.metrics_path), self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self.tracking != "none":
            self._track(row)

    def _track(self, row: dict[str, Any]) -> None:
        """A tracker is a view: when it fails the run goes on, metrics.jsonl holds every row."""
        try:
            if self._tracker is None:
                self._tracker = tracking.open_tracker(self.tracking, self.path, self._resumed_after)
            self._tracker.log(row)
        except Exception as err:  # any failure of the tracker: reported, and the run goes on
            log.warning("output.tracking = %r failed at round %s (%s: %s); tracking stops, %s has every row",
                        self.tracking, row.get("round"), type(err).__name__, err, self.metrics_path)
            self.tracking, self._tracker = "none", None

    def close_tracking(self) -> None:
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            tracker.close()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows after the checkpoint being resumed, so no round appears twice."""
        rows = [r for r in self.read_metrics() if r["round"] <= last_round]
        _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        self._resumed_after = last_round  # the tracker logs the rounds after it again

    # -- checkpoints ----------------------------------------------------------
    def save_checkpoint(self, ckpt: Checkpoint, keep: int = 2) -> None:
        """Write round-NNNN/ completely, then point `latest` at it."""
        final = self.checkpoints / f"round-{ckpt.round:04d}"
        tmp = self.checkpoints / f".round-{ckpt.round:04d}.tmp"
        with _writing(tmp, partial=tmp):  # a failed write leaves the previous checkpoint as it was
            self.checkpoints.mkdir(exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file({k: np.ascontiguousarray(v) for k, v in ckpt.global_state.items()},
                      str(tmp / "global.safetensors"))
            arrays, meta = _split_arrays(ckpt.state)
            save_file(arrays, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "round": ckpt.round,
                                                        "state": meta}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        _atomic_write(self.checkpoints / "latest", final.name)
        for old in sorted(self.checkpoints.glob("round-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> Checkpoint | None:
        pointer = self.checkpoints / "latest"
        if not pointer.exists():
            return None
        folder = self.checkpoints / pointer.read_text().strip()
        state = json.loads((folder / "state.json").read_text())
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{folder} was written by an earlier fedlora (checkpoint format "
                                  f"{state.get('format', 1)}, this version reads {CHECKPOINT_FORMAT}); finish the "
                                  "run with that version, or start a new run")
        arrays = load_file(str(folder / "state.safetensors"))
        return Checkpoint(state["round"], load_file(str(folder / "global.safetensors")),
                          _join_arrays(state["state"], arrays))

    # -- failure ----------------------------------------------------------------
    @property
    def failure_path(self) -> Path:
        return self.path / FAILED

    def mark_failed(self, reason: str) -> None:
        """Record why the run stopped (read by `fedlora run`); best effort: the disk may be full."""
        try:
            rounds = len(self.read_metrics())
        except (OSError, ValueError):  # a row cut short by the failure
            rounds = None
        try:
            _atomic_write(self.failure_path, json.dumps({"error": reason, "rounds": rounds}))
        except RunDirectoryError as err:
            log.error("could not record the failure: %s", err)

    def clear_failure(self) -> None:
        self.failure_path.unlink(missing_ok=True)

    @property
    def lineage_path(self) -> Path:
        return self.path / "warm_start.json"

    def write_lineage(self, lineage: dict[str, Any]) -> None:
        """Which adapter the run started from, kept for a resume (which does not read it again)."""
        _atomic_write(self.lineage_path, json.dumps(lineage, indent=2))

    def read_lineage(self) -> dict[str, Any] | None:
        return json.loads(self.lineage_path.read_text()) if self.lineage_path.exists() else None

    def write_json(self, name: str, content: dict[str, Any]) -> None:
        _atomic_write(self.path / name, json.dumps(content, indent=2))

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The run's final figures; the run is over, so its tracker is closed."""
        _atomic_write(self.path / "summary.json", json.dumps(summary, indent=2))
        self.close_tracking()


def _split_arrays(tree: Any, prefix: str = "") -> tuple[dict[str, np.ndarray], Any]:
    """Separate numpy arrays (to safetensors) from JSON-able structure."""
    arrays: dict[str, np.ndarray] = {}
    if isinstance(tree, np.ndarray):
        arrays[prefix] = np.ascontiguousarray(tree)
        return arrays, {"__array__": prefix}
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            sub, out[k] = _split_arrays(v, f"{prefix}/{k}")
            arrays.update(sub)
        return arrays, out
    if isinstance(tree, (list, tuple)):
        out_list = []
        for i, v in enumerate(tree):
            sub, item = _split_arrays(v, f"{prefix}/{i}")
            arrays.update(sub)
            out_list.append(item)
        return arrays, out_list
    return arrays, tree


def _join_arrays(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            return arrays[tree["__array__"]]
        return {k: _join_arrays(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join_arrays(v, arrays) for v in tree]
    return tree
