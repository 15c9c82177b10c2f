"""The [secagg] section: what the configuration refuses, and why."""

import tomllib

import pytest

from fedlora import config as cfg
from fedlora.strategies import STRATEGIES

SECURE = ["secagg.enabled=true", "federation.num-sites=4", "federation.min-sites=3"]


def _problems(*overrides: str) -> list[str]:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_config(None, [*SECURE, *overrides])
    return err.value.problems


def test_a_valid_secure_configuration_parses():
    c = cfg.load_config(None, [*SECURE, "secagg.bytes-per-param=2", "secagg.threshold=3"])
    assert c.secagg.enabled and c.secagg.bytes_per_param == 2 and c.secagg.threshold == 3
    assert cfg.from_nested(tomllib.loads(c.to_toml())).secagg == c.secagg  # run directories keep it


@pytest.mark.parametrize("key", ["federation.num-sites=2", "federation.min-sites=2"])
def test_fewer_than_three_sites_are_refused(key):
    problems = _problems(key)
    assert any(">= 3" in p and "learns the other's update" in p for p in problems), problems


def test_sampling_fewer_than_three_sites_per_round_is_refused():
    problems = _problems("federation.fraction-train=0.5")
    assert any("fraction-train" in p and "samples 2 of 4" in p for p in problems), problems


@pytest.mark.parametrize("name", sorted(n for n, c in STRATEGIES.items() if not c.linear))
def test_non_linear_strategies_are_refused_with_the_reason(name):
    problems = _problems(f'strategy.name="{name}"', "federation.min-sites=5", "federation.num-sites=6")
    refusal = [p for p in problems if "secure aggregation" in p and name in p]
    assert refusal and "only learns the sum" in refusal[0] and STRATEGIES[name].needs in refusal[0]


@pytest.mark.parametrize("name", sorted(n for n, c in STRATEGIES.items() if c.linear))
def test_linear_strategies_are_accepted(name):
    assert cfg.load_config(None, [*SECURE, f'strategy.name="{name}"']).strategy.name == name


def test_coordinator_side_client_dp_is_refused_in_favour_of_distributed_dp():
    problems = _problems("privacy.client-dp=true")
    assert any("privacy.client-dp" in p and "secagg.dp-noise-multiplier" in p for p in problems), problems


def test_protocol_parameters_are_checked_for_the_round_size():
    problems = _problems("secagg.threshold=5")  # 4 sites: a neighbourhood holds 4
    assert any("threshold 5 exceeds the neighbourhood size 4" in p for p in problems), problems
    assert any("bytes-per-param" in p for p in _problems("secagg.bytes-per-param=5"))


def test_distributed_dp_clip_must_fit_the_fixed_point_range():
    problems = _problems("secagg.dp-noise-multiplier=1.0", "secagg.dp-clip=2.0")
    assert any("secagg.dp-clip" in p and "clip-range" in p for p in problems), problems


@pytest.mark.parametrize("text, needle", [("1@nowhere", "site@stage"), ("x@setup", "integers"),
                                          ("9@unmask", "not in 0..3"), ("1@unmask@0", "round >= 1")])
def test_fault_injection_entries_are_checked(text, needle):
    problems = _problems(f'simulation.secagg-dropouts="{text}"')
    assert any("simulation.secagg-dropouts" in p and needle in p for p in problems), problems


def test_secure_only_options_are_refused_when_secure_aggregation_is_off():
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_config(None, ['simulation.secagg-dropouts="1@setup"', "secagg.dp-noise-multiplier=1"])
    assert sum("only applies with secagg.enabled" in p for p in err.value.problems) == 2


def test_a_defeatable_threshold_is_refused_unless_explicitly_allowed_and_recorded():
    problems = _problems("federation.num-sites=6", "secagg.threshold=3")
    assert any("secagg" in p and "dropout lists" in p and "threshold >= 4" in p for p in problems), problems
    c = cfg.load_config(None, [*SECURE, "federation.num-sites=6", "secagg.threshold=3",
                               "secagg.allow-weak-threshold=true"])
    assert c.secagg.allow_weak_threshold and "secagg_weak_threshold" in cfg.describe_options()
