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
