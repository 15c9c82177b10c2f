"""output.tracking: each metrics row of a real run, read back from TensorBoard's event files
and from MLflow's store, equals the row in metrics.jsonl (numbers only, step = round)."""

import json
import struct
import sys

import numpy as np
import pytest

from fedlora import config as cfg
from fedlora.server.rundir import RunDirectory
from fedlora.server.tracking import scalars
from fedlora.simulations.inprocess import run_inprocess

ROUNDS = 2


def _run(tiny_bert_dir, out, tracking: str):
    """A tiny real run with DP-SGD (so rows carry a per-site map, epsilon_per_site)."""
    config = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', "model.max-length=32", "federation.num-sites=2",
                                    f"federation.rounds={ROUNDS}", "data.records-per-site=30", "train.local-steps=2",
                                    "privacy.enabled=true", "privacy.batch-size=8", "privacy.delta=1e-3",
                                    f"output.tracking={tracking}"])
    out = run_inprocess(config, out)
    rows = RunDirectory(out).read_metrics()
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    return out, rows


def _events(folder):
    """(file, Event) of every record in folder's event files, in TensorBoard's order (by name)."""
    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):  # TFRecord: length (u64), its crc (u32), the record, its crc (u32)
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            yield path, Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length


def _tensorboard_scalars(folder) -> dict[int, dict[str, float]]:
    by_step: dict[int, dict[str, float]] = {}
    for _, event in _events(folder):
        for value in event.summary.value:
            assert value.tag not in by_step.get(event.step, {}), (value.tag, event.step)  # logged once
            by_step.setdefault(event.step, {})[value.tag] = value.simple_value
    return by_step


def test_scalars_are_the_numbers_of_a_row_with_maps_flattened():
    row = {"round": 3, "train_loss": 0.5, "sites": 2, "ok": True, "note": "x", "aggregation_error": None,
           "epsilon_per_site": {"site-0": 1.5, "Hospital (A)": 2}, "eval_confusion": [[1, 0], [0, 1]],
           "eval_sites": {"site-0": {"eval_accuracy": 0.75, "eval_per_class": {"a": {"f1": 0.5, "precision": None}}}}}
    assert scalars(row) == {"train_loss": 0.5, "sites": 2.0, "epsilon_per_site/site-0": 1.5,
                            "epsilon_per_site/Hospital _A_": 2.0, "eval_sites/site-0/eval_accuracy": 0.75,
                            "eval_sites/site-0/eval_per_class/a/f1": 0.5}


def test_tensorboard_events_equal_metrics_jsonl(tiny_bert_dir, tmp_path):
    pytest.importorskip("tensorboardX")
    out, rows = _run(tiny_bert_dir, tmp_path / "run", "tensorboard")
    logged = _tensorboard_scalars(out / "tensorboard")
    assert sorted(logged) == [r["round"] for r in rows]  # step = round
    for row in rows:
        expected = scalars(row)
        assert {"eval_loss", "bytes_up", "epsilon", "epsilon_per_site/site-0",
                "epsilon_per_site/site-1"} <= expected.keys()
        assert logged[row["round"]].keys() == expected.keys()
        for name, value in expected.items():  # TensorBoard keeps scalars as float32
            assert logged[row["round"]][name] == np.float32(value), name


def test_mlflow_run_equals_metrics_jsonl(tiny_bert_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    out, rows = _run(tiny_bert_dir, tmp_path / "run", "mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedlora")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    assert run.data.tags["fedlora.run_dir"] == str(out)
    expected = {name for row in rows for name in scalars(row)}
    assert set(run.data.metrics) == expected
    for name in expected:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert history == [(r["round"], scalars(r)[name]) for r in rows if name in scalars(r)], name


def test_a_missing_package_fails_at_the_start_naming_the_extra(tmp_path, monkeypatch):
    from fedlora.simulations.launcher import simulate

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # what `import tensorboardX` does when absent
    config = cfg.load_config(None, ["output.tracking=tensorboard", "task.labels=a,b"])
    with pytest.raises(cfg.ConfigError, match=r"tensorboardX.*pip install 'fedlora\[tracking\]'"):
        simulate(config, tmp_path / "sim")  # before anything starts
    assert not (tmp_path / "sim").exists()
    with pytest.raises(cfg.ConfigError, match=r"fedlora\[tracking\]"):  # the ServerApp, at its start
        RunDirectory(tmp_path / "run").start_tracking(config.output.tracking)
    with pytest.raises(cfg.ConfigError, match="output.tracking"):
        cfg.load_config(None, ["output.tracking=wandb"])


def test_a_resumed_run_purges_the_rounds_it_logs_again(tmp_path):
    pytest.importorskip("tensorboardX")
    first = RunDirectory(tmp_path)
    first.start_tracking("tensorboard")
    for r in (1, 2, 3):
        first.append_metrics({"round": r, "eval_loss": 1.0 / r})
    first.close_tracking()  # the coordinator stopped after round 3; the checkpoint is round 2
    again = RunDirectory(tmp_path)
    again.start_tracking("tensorboard")
    again.truncate_metrics(2)
    for r in (3, 4):
        again.append_metrics({"round": r, "eval_loss": 10.0 / r})
    again.write_summary({})
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    starts = [(path, e.step) for path, e in _events(tmp_path / "tensorboard") if e.HasField("session_log")]
    assert starts == [(files[0], 1), (files[1], 3)]  # TensorBoard drops earlier events from that step on
    # what TensorBoard then shows: each round once, the resumed values after the checkpoint
    shown: dict[int, float] = {}
    for _, event in _events(tmp_path / "tensorboard"):
        if event.HasField("session_log"):
            shown = {step: v for step, v in shown.items() if step < event.step}
        for value in event.summary.value:
            shown[event.step] = value.simple_value
    assert shown == {1: 1.0, 2: np.float32(0.5), 3: np.float32(10 / 3), 4: 2.5}
    assert [r["round"] for r in again.read_metrics()] == [1, 2, 3, 4]


def test_a_failing_tracker_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    import fedlora.server.tracking as tracking

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(tracking, "open_tracker", broken)
    rundir = RunDirectory(tmp_path)
    rundir.tracking = "tensorboard"  # as if started; its package need not be installed here
    with caplog.at_level("WARNING"):
        rundir.append_metrics({"round": 1, "eval_loss": 1.0})
        rundir.append_metrics({"round": 2, "eval_loss": 0.5})
    assert "disk full" in caplog.text and caplog.text.count("tracking stops") == 1
    assert [r["round"] for r in rundir.read_metrics()] == [1, 2]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["eval_loss"] == 0.5
