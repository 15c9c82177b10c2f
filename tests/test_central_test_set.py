"""The run's central test figures are what they say they are.

`test_*` columns, predictions.jsonl and the report's test curves come from a central test set only
when it belongs to the run: data.test-path, or the synthetic corpus' held-out test set when the
sites train on that same corpus. Sites with their own data (a deployment, or a simulation on
data.path) and no data.test-path: no central evaluation, and the summary and report say so.
"""

import json

import pytest

from fedlora import config as cfg
from fedlora.data import synthetic
from fedlora.data.sites import central_test_set
from fedlora.simulations.inprocess import run_inprocess
from fedlora.tasks import build_task

TINY = ["model.max-length=16", "federation.num-sites=2", "federation.rounds=1", "data.records-per-site=12",
        "train.local-steps=1", "train.batch-size=4"]


def _rows(path, n, site):
    rows = synthetic.site_records(site, 2, n, seed=3)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tiny_bert_dir, out, sets, node_configs=None):
    config = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', *TINY, *sets])
    out = run_inprocess(config, out, node_configs=node_configs)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return out, rows, summary, (out / "report.html").read_text()


@pytest.fixture(scope="module")
def deployed_sites(tmp_path_factory):
    """Node configs like those of deployed SuperNodes: each site names its own file."""
    folder = tmp_path_factory.mktemp("site-data")
    return [{"data-path": str(_rows(folder / f"hospital-{i}.jsonl", 12, i)), "site": f"hospital-{i}",
             "site-index": i} for i in range(2)]


def test_sites_with_their_own_data_and_no_test_path_give_no_central_figures(tiny_bert_dir, deployed_sites,
                                                                             tmp_path):
    out, rows, summary, report = _run(tiny_bert_dir, tmp_path / "run",
                                      [f"task.labels={','.join(synthetic.LABELS)}"], deployed_sites)
    assert rows and not [k for r in rows for k in r if k.startswith("test_")]
    assert "eval_accuracy" in rows[-1]  # the sites' own evaluation stands
    assert not (out / "predictions.jsonl").exists()
    central = summary["central_test"]
    assert central["set"] == "none" and "rows" not in central
    assert "no central test set" in central["about"] and "sites' own evaluation" in central["about"]
    assert "no central test set" in report and "synthetic" not in report
    for site in deployed_sites:  # nothing of a site's path in the coordinator's run directory
        assert site["data-path"] not in report and site["data-path"] not in json.dumps(summary)


def test_a_test_path_is_evaluated_and_named(tiny_bert_dir, deployed_sites, tmp_path):
    test = _rows(tmp_path / "consortium-test.jsonl", 20, 1)
    out, rows, summary, report = _run(tiny_bert_dir, tmp_path / "run",
                                      [f"task.labels={','.join(synthetic.LABELS)}", f'data.test-path="{test}"'],
                                      deployed_sites)
    assert {"test_accuracy", "test_macro_f1", "test_loss"} <= rows[-1].keys()
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 20
    central = summary["central_test"]
    assert central == {"set": "file", "file": "consortium-test.jsonl", "rows": 20, "about": central["about"]}
    assert "consortium-test.jsonl" in central["about"] and "consortium-test.jsonl" in report


def test_the_synthetic_simulation_is_scored_on_the_synthetic_test_set_and_says_so(tiny_bert_dir, tmp_path):
    out, rows, summary, report = _run(tiny_bert_dir, tmp_path / "run", [])
    assert {"test_accuracy", "test_macro_f1"} <= rows[-1].keys()
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 500
    central = summary["central_test"]
    assert central["set"] == "synthetic" and central["rows"] == 500
    assert "synthetic corpus' held-out test set" in central["about"]
    assert "synthetic corpus&#x27; held-out test set" in report or "synthetic corpus' held-out test set" in report


def test_a_simulation_on_its_own_data_path_has_no_central_test_set(tmp_path):
    data = _rows(tmp_path / "notes.jsonl", 30, 0)
    config = cfg.load_config(None, [f'data.path="{data}"', f"task.labels={','.join(synthetic.LABELS)}"])
    central = central_test_set(config, build_task(config), simulated_sites=True)
    assert central.set == "none" and not central.rows and "data.path" in central.about
    assert str(data) not in central.about
    synthetic_sites = cfg.load_config(None, [])
    assert central_test_set(synthetic_sites, build_task(synthetic_sites), simulated_sites=True).set == "synthetic"
    deployed = central_test_set(synthetic_sites, build_task(synthetic_sites), simulated_sites=False)
    assert deployed.set == "none" and "own data" in deployed.about


def test_the_simulation_engines_grid_is_the_one_with_simulated_sites():
    """fedlora.flower.simulated_sites knows Flower's Simulation Engine grid by its class; an upgrade
    that moves it fails here, not silently as a simulation without its central test set."""
    import importlib

    from flwr.serverapp import Grid

    from fedlora import flower
    from fedlora.simulations.inprocess import InProcessGrid

    engine_grid = importlib.import_module("flwr.simulation.run_simulation").InMemoryGrid  # the grid it builds
    assert engine_grid.__module__ == flower.INMEMORY_GRID_MODULE and issubclass(engine_grid, Grid)
    assert flower.simulated_sites(engine_grid.__new__(engine_grid))

    deployed_grid = importlib.import_module("flwr.superlink.runtime.run_serverapp").HttpGrid  # a deployment's
    assert not flower.simulated_sites(deployed_grid.__new__(deployed_grid))
    grid = InProcessGrid(None, {}, 2)
    assert flower.simulated_sites(grid)
    next(iter(grid.contexts.values())).node_config["data-path"] = "notes.jsonl"  # a site with its own file
    assert not flower.simulated_sites(grid)
