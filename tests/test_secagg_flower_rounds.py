"""Secure training rounds with the real coordinator and site code, in one process (InProcessGrid).

Every message crosses Flower's serialization; sites train tiny-bert for real.
"""

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora import config as cfg
from fedlora.client.app import app as client_app
from fedlora.client.secure import STATE
from fedlora.simulations import misbehaving
from fedlora.models import load_model, trainable_state
from fedlora.privacy.secagg.distributed_dp import epsilon_exact
from fedlora.privacy.secagg.records import from_config_record
from fedlora.server.app import build_coordinator
from fedlora.server.rundir import RunDirectory
from fedlora.simulations.inprocess import InProcessGrid, run_inprocess
from fedlora.data.labels import infer_labels
from fedlora.tasks import build_task

BASE = ["model.name=tiny-bert", "model.max-length=32", "data.records-per-site=40", "train.local-steps=2",
        "federation.min-sites=3", "secagg.max-weight=100"]
SECURE = ["secagg.enabled=true"]


def _coordinator(path, *overrides, sites=4):
    config = infer_labels(cfg.load_config(None, [*BASE, f"federation.num-sites={sites}", f'output.dir="{path}"',
                                                 *overrides]))  # output.dir: where simulated sites keep DP ledgers
    loaded = load_model(config, build_task(config))
    app = misbehaving.app if misbehaving.misbehaves(config) else client_app  # simulated dropouts are a test mod
    grid = InProcessGrid(app, config.to_flat(), sites)  # same seed: same node ids in every test
    coordinator = build_coordinator(grid, config, RunDirectory(path), None, loaded.fingerprint)
    return coordinator, trainable_state(loaded.model), grid


def _node(grid, partition_id):
    return next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == partition_id)


def _assert_same_adapter(got, expected, bound):
    """Equal within the fixed-point bound, plus float32 rounding of the two paths (a few ulps)."""
    assert got.keys() == expected.keys()
    for k in expected:
        ulps = 4 * np.spacing(np.maximum(np.abs(got[k]), np.abs(expected[k])).astype(np.float32))
        assert np.all(np.abs(got[k].astype(np.float64) - expected[k]) <= bound + ulps), k


def test_a_site_failing_after_key_agreement_is_recovered_and_the_others_aggregate_exactly(tmp_path):
    secure, state, grid = _coordinator(tmp_path / "s", *SECURE, 'simulation.secagg-dropouts="1@masked-input"')
    nodes, dropped = sorted(grid.get_node_ids()), _node(grid, 1)
    new_state, row = secure.train_round(nodes, state, 1)
    assert row["sites"] == 3 and row["secagg_dropped"] == [f"node-{dropped}"] and "secagg_failed" not in row
    assert row["secagg_bytes_per_param"] == 4 and 0 < row["secagg_max_error"] < 1e-6
    plain, plain_state, _ = _coordinator(tmp_path / "p")
    expected, plain_row = plain.train_round([n for n in nodes if n != dropped], plain_state, 1)
    _assert_same_adapter(new_state, expected, row["secagg_max_error"])
    assert row["train_loss"] == pytest.approx(plain_row["train_loss"], abs=1e-5)
    assert not any(np.array_equal(new_state[k], state[k]) for k in state if "lora_B" in k)  # it trained


def test_below_the_threshold_the_round_fails_and_the_adapter_is_unchanged(tmp_path):
    secure, state, grid = _coordinator(tmp_path, *SECURE, 'simulation.secagg-dropouts="1@masked-input,2@unmask"')
    new_state, row = secure.train_round(sorted(grid.get_node_ids()), state, 1)
    assert new_state is state and row["sites"] == 0
    assert "SecAggAbort" in row["secagg_failed"] and "3 needed" in row["secagg_failed"]
    assert row["bytes_up"] > 0 and row["bytes_down"] > 0  # what crossed the wire before it failed


@pytest.mark.parametrize("strategy", ["ffa", "fedadam", "fedsa"])
def test_linear_strategies_get_the_same_adapter_as_without_secure_aggregation(tmp_path, strategy):
    name = f'strategy.name="{strategy}"'
    secure, state, grid = _coordinator(tmp_path / "s", *SECURE, name, sites=3)
    plain, plain_state, _ = _coordinator(tmp_path / "p", name, sites=3)
    nodes = sorted(grid.get_node_ids())
    for server_round in (1, 2):  # fedadam's moments and fedsa's site-kept B carry over
        state, row = secure.train_round(nodes, state, server_round)
        plain_state, _ = plain.train_round(nodes, plain_state, server_round)
        _assert_same_adapter(state, plain_state, 2 * row["secagg_max_error"])
        plain_state = state  # compare round 2 from the same start: a round's error is its own


def test_uploads_are_packed_to_the_configured_width(tmp_path):
    secure, state, grid = _coordinator(tmp_path / "s", *SECURE, "secagg.bytes-per-param=2", sites=3)
    plain, plain_state, _ = _coordinator(tmp_path / "p", sites=3)
    nodes = sorted(grid.get_node_ids())
    params = sum(v.size for v in state.values())
    _, row = secure.train_round(nodes, state, 1)
    _, plain_row = plain.train_round(nodes, plain_state, 1)
    assert row["secagg_bytes_per_param"] == 2
    # Three sites upload 2 bytes per parameter (plus keys, shares and metadata); plain uploads 4.
    assert 3 * 2 * params < row["bytes_up"] < 3 * 2 * params + 3 * 3000
    assert plain_row["bytes_up"] > 3 * 4 * params


def test_secrets_stay_in_the_site_state_and_are_spent_after_masking(tmp_path):
    secure, state, grid = _coordinator(tmp_path, *SECURE, sites=3)
    secure.train_round(sorted(grid.get_node_ids()), state, 1)
    for node, context in grid.contexts.items():
        saved = from_config_record(context.state.config_records[STATE])
        assert saved["node_id"] == node and saved["stage"] == "unmask"
        assert saved["enc_sk"] == saved["mask_sk"] == saved["seed"] == b""  # deleted once shares were out


def test_dp_sgd_and_distributed_dp_compose_with_secure_aggregation(tmp_path):
    sigma, clip = 1.0, 0.05
    secure, state, grid = _coordinator(tmp_path, *SECURE, "privacy.enabled=true", "privacy.delta=1e-3", "privacy.batch-size=8",
                                       f"secagg.dp-noise-multiplier={sigma}", f"secagg.dp-clip={clip}",
                                       "privacy.trainable=adapter")
    new_state, row = secure.train_round(sorted(grid.get_node_ids()), state, 1)
    assert row["sites"] == 4 and "train_loss" not in row  # neither DP releases a loss
    assert row["epsilon"] > 0  # each site's DP-SGD spend, reported in clear
    # ...but not the sampling rate, steps or sigma: batch / q would give away the record count the masked
    # weight hides (an audit finding); the coordinator's record of them stays empty.
    reports = secure.privacy.sites.values()
    assert reports and all(math.isnan(r["sample_rate"]) and math.isnan(r["noise_multiplier"]) for r in reports)
    # With a sigma the run fixes, an exact epsilon would pin down q as well: sites send it rounded up to a
    # tenth, and a delta that is a power of ten (1/(10 units) to the digit would be the count itself).
    assert all(round(r["epsilon"] * 10, 9) == int(round(r["epsilon"] * 10)) for r in reports)
    assert all(math.log10(r["delta"]) == int(math.log10(r["delta"])) for r in reports)
    assert row["secagg_dp_epsilon"] == pytest.approx(epsilon_exact(sigma, 1, 1e-5))
    # fedit adds the mean update: its coordinates are the noise (4 sites, threshold 3) plus a
    # clipped signal of norm <= clip over ~4400 coordinates, negligible beside it.
    mean = np.concatenate([(new_state[k].astype(np.float64) - state[k]).ravel() for k in state])
    expected_std = sigma * clip * math.sqrt(4 / 3) / 4
    assert np.std(mean) == pytest.approx(expected_std, rel=0.1)


def test_a_run_continues_after_a_failed_round_with_the_adapter_unchanged(tmp_path):
    """The whole ServerApp run (the plain-vs-secure whole-run comparison is the Ray test)."""
    config = infer_labels(cfg.load_config(None, [*BASE, "federation.num-sites=4", "federation.rounds=2", *SECURE,
                                                 'simulation.secagg-dropouts="1@masked-input@1,2@masked-input@1"']))
    run = run_inprocess(config, tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "secagg_failed" in rows[0] and rows[0]["sites"] == 0
    assert "secagg_failed" not in rows[1] and rows[1]["sites"] == 4 and rows[1]["secagg_dropped"] == []
    initial = trainable_state(load_model(config, build_task(config)).model)
    after_failed = load_file(run / "checkpoints" / "round-0001" / "global.safetensors")
    assert all(np.array_equal(after_failed[k], initial[k]) for k in initial)
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2
