import json

import numpy as np
import pytest

from fedlora.server.rundir import Checkpoint, CheckpointError, RunDirectory


def test_checkpoint_round_trips_the_nested_coordinator_state_and_keeps_the_latest(tmp_path):
    run = RunDirectory(tmp_path)
    for rnd in (1, 2, 3):
        state = {"strategy": {"m": {"layer.w": np.full((2, 3), rnd, np.float32)}, "t": rnd, "names": ["a", "b"]},
                 "sites": {"s": {"last_round": rnd}}, "privacy": {"stopped": None}}
        run.save_checkpoint(Checkpoint(rnd, {"x": np.arange(4, dtype=np.float32) * rnd}, state))
    ckpt = run.load_checkpoint()
    assert ckpt.round == 3 and ckpt.state["sites"] == {"s": {"last_round": 3}}
    assert np.array_equal(ckpt.global_state["x"], np.arange(4, dtype=np.float32) * 3)
    assert np.array_equal(ckpt.state["strategy"]["m"]["layer.w"], np.full((2, 3), 3, np.float32))
    assert ckpt.state["strategy"]["t"] == 3 and ckpt.state["strategy"]["names"] == ["a", "b"]
    assert ckpt.state["privacy"] == {"stopped": None}
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*")) == ["round-0002", "round-0003"]


def test_a_checkpoint_of_another_format_is_refused_with_what_to_do(tmp_path):
    run = RunDirectory(tmp_path)
    run.save_checkpoint(Checkpoint(1, {"x": np.zeros(2, np.float32)}, {"strategy": {}}))
    meta = tmp_path / "checkpoints" / "round-0001" / "state.json"
    meta.write_text(json.dumps({"round": 1, "strategy": {}, "extra": {}}))  # as fedlora wrote it before format 2
    with pytest.raises(CheckpointError, match="earlier fedlora"):
        run.load_checkpoint()


def test_resume_drops_metric_rows_after_the_checkpoint(tmp_path):
    run = RunDirectory(tmp_path)
    for rnd in (1, 2, 3):
        run.append_metrics({"round": rnd, "train_loss": 1.0 / rnd})
    run.truncate_metrics(2)
    assert [r["round"] for r in run.read_metrics()] == [1, 2]
    assert RunDirectory(tmp_path / "fresh").load_checkpoint() is None


# -- a disk that fills up -----------------------------------------------------------------------------
def _disk_fills_after(monkeypatch, n_files: int):
    """safetensors writes: the first `n_files` succeed, the next writes a few bytes and fails as it does
    on a full disk: with its own error (not an OSError), worded as on a full tmpfs."""
    from safetensors import SafetensorError

    from fedlora.server import rundir

    real, calls = rundir.save_file, []

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) <= n_files:
            return real(tensors, path)
        with open(path, "wb") as fh:
            fh.write(b"\0" * 64)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(rundir, "save_file", save_file)


def test_a_full_disk_names_the_path_and_the_error_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    from fedlora.server.rundir import RunDirectoryError

    run = RunDirectory(tmp_path)
    run.save_checkpoint(Checkpoint(1, {"x": np.zeros(2, np.float32)}, {"strategy": {}}))
    _disk_fills_after(monkeypatch, 1)  # round 2's global.safetensors fits, its state.safetensors does not
    with pytest.raises(RunDirectoryError) as err:
        run.save_checkpoint(Checkpoint(2, {"x": np.ones(2, np.float32)}, {"strategy": {}}))
    assert "No space left on device" in str(err.value) and ".round-0002.tmp" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "round-0001"]
    assert run.load_checkpoint().round == 1  # the last complete checkpoint still resumes


def test_a_run_whose_disk_fills_is_marked_failed_with_the_reason(tmp_path, monkeypatch, tiny_bert_dir):
    from fedlora import config as cfg
    from fedlora.deploy.submit import _why_it_stopped
    from fedlora.server.rundir import RunDirectoryError
    from fedlora.simulations.inprocess import run_inprocess

    config = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', "model.max-length=16", "federation.num-sites=2",
                                    "federation.rounds=2", "data.records-per-site=12", "train.local-steps=1",
                                    "train.batch-size=4"])
    _disk_fills_after(monkeypatch, 2)  # round 1's checkpoint is written, round 2's is not
    with pytest.raises(RunDirectoryError):
        run_inprocess(config, tmp_path / "run")
    failed = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert "No space left on device" in failed["error"] and failed["rounds"] == 2
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp"))
    # What `fedlora run` tells the operator, instead of "the coordinator stopped".
    told = _why_it_stopped(tmp_path / "run", tmp_path / "run" / "flower.log")
    assert told.startswith("the run failed: cannot write") and "No space left on device" in told
    assert f"--resume --out {tmp_path / 'run'}" in told
