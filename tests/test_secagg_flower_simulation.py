"""Secure aggregation on Flower's real Simulation Engine (Ray): same adapter as without it."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora import config as cfg
from fedlora.simulations.launcher import simulate

pytestmark = pytest.mark.simulation

COMMON = ["model.max-length=32", "federation.num-sites=3", "federation.min-sites=3", "federation.rounds=1",
          "data.records-per-site=40", "train.local-steps=3", "secagg.max-weight=100"]


def test_a_secure_run_ends_at_the_plain_runs_adapter_within_the_fixed_point_error(tiny_bert_dir, tmp_path):
    model = f'model.name="{tiny_bert_dir}"'
    plain = simulate(cfg.load_config(None, [model, *COMMON]), tmp_path / "plain")
    secure = simulate(cfg.load_config(None, [model, *COMMON, "secagg.enabled=true", "secagg.bytes-per-param=3"]),
                      tmp_path / "secure")
    row = json.loads((secure / "metrics.jsonl").read_text().splitlines()[0])
    plain_row = json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])
    assert row["sites"] == 3 and row["secagg_dropped"] == [] and row["secagg_bytes_per_param"] == 3
    got, expected = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (secure, plain))
    assert got.keys() == expected.keys()
    for k in expected:  # the fixed-point bound, plus float32 rounding of the two paths
        ulps = 4 * np.spacing(np.maximum(np.abs(got[k]), np.abs(expected[k])))
        assert np.all(np.abs(got[k].astype(np.float64) - expected[k]) <= row["secagg_max_error"] + ulps), k
    assert any(np.abs(got[k] - expected[k]).max() > 0 for k in expected)  # it did go through fixed point
    params = json.loads((secure / "summary.json").read_text())["parameters"]["adapter"]
    # Training uploads: 3 bytes per parameter masked, against 4 for float32 (evaluation replies are tiny).
    assert row["bytes_up"] < 0.8 * plain_row["bytes_up"] and row["bytes_up"] > 3 * 3 * params
    assert row["train_loss"] == pytest.approx(plain_row["train_loss"], abs=1e-3)
