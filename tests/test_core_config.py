import tomllib
from pathlib import Path

import pytest

from fedlora import config as cfg

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_round_trip_through_flat_and_toml(tmp_path):
    c = cfg.load_config()
    assert c.model.name == "minilm" and c.federation.num_sites >= 4
    assert cfg.from_flat(c.to_flat()) == c
    path = tmp_path / "c.toml"
    c.save(path)
    assert cfg.load_config(path) == c


def test_every_problem_is_reported_together():
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_config(None, ["lora.rank=0", "federation.rounds=abc", "nope.key=1", "model.colour=1",
                               "strategy.name=magic", "task.type=regression", "data.eval-fraction=1.5"])
    text = str(err.value)
    for fragment in ("lora.rank", "federation.rounds: expected int", "unknown section [nope]",
                     "unknown key model.colour", "strategy.name: unknown strategy 'magic'",
                     "task.type: 'regression' is not one of", "data.eval-fraction"):
        assert fragment in text
    assert len(err.value.problems) == 7


def test_toml_file_and_overrides_merge_with_overrides_winning(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[federation]\nrounds = 7\nnum-sites = 3\n[lora]\ntarget-modules = ["query", "key"]\n')
    c = cfg.load_config(path, ["federation.rounds=2", "model.name=tiny-bert"])
    assert (c.federation.rounds, c.federation.num_sites, c.model.name) == (2, 3, "tiny-bert")
    assert c.target_modules == ["query", "key"]


def test_bad_toml_and_missing_file_are_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname=")
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.load_config(bad)
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load_config(tmp_path / "missing.toml")


def test_column_partition_needs_a_column_and_labels_must_be_unique():
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_config(None, ["data.partition=column", "task.labels=a,b,a"])
    assert "data.partition-column" in str(err.value) and "duplicate" in str(err.value)


def test_pyproject_is_the_flower_app_with_real_components():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["fab-format-version"] == 1 and app["publisher"]
    import importlib

    for key, expected in (("serverapp", "ServerApp"), ("clientapp", "ClientApp")):
        module, attr = app["components"][key].split(":")
        assert type(getattr(importlib.import_module(module), attr)).__name__ == expected
    torch_pin = next(d for d in project["project"]["dependencies"] if d.startswith("torch"))
    assert torch_pin == "torch==2.13.0"  # never a range that pulls a newer CUDA build


def test_describe_options_lists_every_key_with_help():
    text = cfg.describe_options()
    for section, table in cfg.RunConfig().to_nested().items():
        assert f"[{section}]" in text
        for key, value in table.items():
            if isinstance(value, dict):  # a strategy's own table
                assert f"[{section}.{key}]" in text and all(f"  {k} = " in text for k in value)
            else:
                assert f"  {key} = " in text
