"""fedlora as a Flower app: the repository's pyproject declares every default, and a run that
comes in through Flower's own `flwr run` (flat run config, no labels filled in by fedlora's
launcher) behaves as `fedlora simulate` does."""

import json
import tomllib
from pathlib import Path

from flwr.app import Context, RecordDict

from fedlora import config as cfg
from fedlora import flower
from fedlora.client.app import app as site_app
from fedlora.data import synthetic
from fedlora.flower_app import app_config_defaults
from fedlora.server.app import main
from fedlora.simulations.inprocess import RUN_ID, InProcessGrid

ROOT = Path(__file__).resolve().parents[1]


def _flat(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_repositorys_flower_app_declares_every_default():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == app_config_defaults()
    assert _flat(declared) == cfg.RunConfig().to_flat()  # Flower flattens the tables into these keys
    parsed = cfg.from_flat(_flat(declared))
    assert parsed.federation.num_sites == cfg.DEFAULT_SITES and parsed.task.labels == []


def test_a_run_from_flwr_run_infers_the_labels_at_the_coordinator_and_the_sites(tmp_path):
    """As `flwr run . local --run-config ...` hands it over: the declared defaults plus overrides,
    task.labels empty. The ServerApp and every simulated site infer the same labels."""
    declared = _flat(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    flat = {**declared, "model.name": "tiny-bert", "model.max-length": 32, "data.records-per-site": 24,
            "train.local-steps": 1, "federation.rounds": 1, "output.dir": str(tmp_path)}
    grid = InProcessGrid(site_app, flat, 3)
    main(grid, Context(run_id=RUN_ID, node_id=flower.SERVER_NODE_ID, node_config={}, state=RecordDict(),
                       run_config=flat))
    assert cfg.load_config(tmp_path / "config.toml").task.labels == synthetic.LABELS
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["sites"] == 3 and rows[0]["rejected"] == 0
