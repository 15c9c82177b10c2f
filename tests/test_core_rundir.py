import numpy as np

from fedlora.server.rundir import Checkpoint, RunDirectory


def test_checkpoint_round_trips_nested_strategy_state_and_keeps_the_latest(tmp_path):
    run = RunDirectory(tmp_path)
    for rnd in (1, 2, 3):
        state = {"m": {"layer.w": np.full((2, 3), rnd, np.float32)}, "t": rnd, "names": ["a", "b"]}
        run.save_checkpoint(Checkpoint(rnd, {"x": np.arange(4, dtype=np.float32) * rnd}, state, {"sites": {"s": rnd}}))
    ckpt = run.load_checkpoint()
    assert ckpt.round == 3 and ckpt.extra == {"sites": {"s": 3}}
    assert np.array_equal(ckpt.global_state["x"], np.arange(4, dtype=np.float32) * 3)
    assert np.array_equal(ckpt.strategy_state["m"]["layer.w"], np.full((2, 3), 3, np.float32))
    assert ckpt.strategy_state["t"] == 3 and ckpt.strategy_state["names"] == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*")) == ["round-0002", "round-0003"]


def test_resume_drops_metric_rows_after_the_checkpoint(tmp_path):
    run = RunDirectory(tmp_path)
    for rnd in (1, 2, 3):
        run.append_metrics({"round": rnd, "train_loss": 1.0 / rnd})
    run.truncate_metrics(2)
    assert [r["round"] for r in run.read_metrics()] == [1, 2]
    assert RunDirectory(tmp_path / "fresh").load_checkpoint() is None
