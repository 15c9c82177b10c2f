"""The [strategy] configuration: unknown names, bad parameters, impossible combinations,
and the compatibility table in docs/strategies.md."""

import types
from pathlib import Path

import numpy as np
import pytest

from fedlora import config as cfg
from fedlora.strategies import STRATEGIES, SiteUpdate, build_strategy
from fedlora.strategies.compose import compatibility_table


def _problems(*sets: str) -> list[str]:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_config(None, list(sets))
    return err.value.problems


def test_unknown_strategy_lists_every_available_one():
    (problem,) = _problems("strategy.name=fedavg2")
    assert "unknown strategy 'fedavg2'" in problem
    assert all(name in problem for name in STRATEGIES)
    with pytest.raises(ValueError, match="available"):
        build_strategy(cfg.RunConfig(strategy=cfg.StrategySection(name="nope")))


def test_combinations_are_derived_from_declarations_not_names():
    """Every wrapper that needs individual updates is refused under secure aggregation, with its own reason."""
    problems = "\n".join(_problems("secagg.enabled=true", "federation.min-sites=3", "strategy.norm-bound=1",
                                   "compression.method=int8"))
    assert "strategy.norm-bound cannot run under secure aggregation" in problems
    assert "cannot bound the norm of an update it never sees" in problems
    assert "compression.method = 'int8' cannot run under secure aggregation" in problems


def test_bad_parameters_are_all_reported_with_their_range():
    problems = "\n".join(_problems("strategy.trimmed-mean.fraction=0.6", "strategy.fedadam.beta1=1.5",
                                   "strategy.fedyogi.tau=0", "strategy.norm-bound=1", "strategy.norm-bound-relative=2",
                                   "strategy.fedprox.mu=-1", "strategy.krum.byzantine=-1"))
    for text in ("strategy.trimmed-mean.fraction: 0.6 not in [0, 0.5)", "strategy.fedadam.beta1: 1.5 not in [0, 1)",
                 "strategy.fedyogi.tau: 0.0 must be > 0", "set at most one", "strategy.fedprox.mu: -1.0 must be >= 0",
                 "strategy.krum.byzantine: -1 must be >= 0"):
        assert text in problems
    assert "unknown key strategy.momentum" in _problems("strategy.momentum=0.9")[0]
    assert "unknown key strategy.fedadam.momentum" in _problems("strategy.fedadam.momentum=0.9")[0]


def test_each_strategy_reads_its_own_table_from_toml_and_from_the_flat_form(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[strategy]\nname = "fedadam"\n[strategy.fedadam]\nserver-lr = 0.05\n'
                    '[strategy.fedprox]\nmu = 0.2\n')
    config = cfg.load_config(path)
    assert config.strategy.params["fedadam"].server_lr == 0.05 and config.strategy.params["fedprox"].mu == 0.2
    assert config.to_flat()["strategy.fedadam.server-lr"] == 0.05
    assert cfg.from_flat(config.to_flat()) == config
    assert build_strategy(config).p.server_lr == 0.05


def test_a_moved_key_names_its_new_place():
    problems = "\n".join(_problems("strategy.proximal-mu=0.1", "strategy.trim-fraction=0.1",
                                   "secagg.simulate-dropouts=1@setup"))
    for text in ("strategy.proximal-mu is now strategy.fedprox.mu", "strategy.trim-fraction is now "
                 "strategy.trimmed-mean.fraction", "secagg.simulate-dropouts is now simulation.secagg-dropouts"):
        assert text in problems


def test_every_strategy_builds_from_the_default_configuration():
    for name in STRATEGIES:
        extra = ["federation.min-sites=3", "strategy.krum.byzantine=0", "strategy.multi-krum.byzantine=0"] \
            if "krum" in name else []
        assert build_strategy(cfg.load_config(None, [f"strategy.name={name}", *extra])).name == name


def test_krum_needs_enough_sites_per_round():
    problems = _problems("strategy.name=krum", "strategy.krum.byzantine=2")
    assert "federation.min-sites: krum with strategy.krum.byzantine = 2 needs at least 7 updates per round" in problems[0]
    assert "federation.fraction-train" in problems[1] and "samples 4" in problems[1]  # 4 sites cannot give 7


def test_heterogeneous_ranks_are_checked():
    cfg.load_config(None, ["strategy.name=flora", "simulation.site-ranks=8,4,4,2"])
    cfg.load_config(None, ["strategy.name=ffa", "simulation.site-ranks=8,4,4,2"])
    (problem,) = _problems("strategy.name=median", "simulation.site-ranks=8,4,4,2")
    assert "cannot take heterogeneous ranks" in problem
    problems = "\n".join(_problems("simulation.site-ranks=8,16,x"))
    assert "simulation.site-ranks: expected int, got 'x'" in problems
    problems = "\n".join(_problems("simulation.site-ranks=8,16,4"))
    assert "3 ranks for federation.num-sites = 4" in problems and "[16] not in 1..lora.rank = 8" in problems


def test_secure_aggregation_refuses_non_linear_strategies_and_says_why():
    base = ["secagg.enabled=true", "federation.min-sites=3"]
    cfg.load_config(None, [*base, "strategy.name=ffa"])
    for name in ("flora", "fedex", "median", "krum"):
        problems = "\n".join(_problems(*base, f"strategy.name={name}", "federation.min-sites=5"))
        assert "cannot run under secure aggregation" in problems and "only learns the sum" in problems
    problems = "\n".join(_problems(*base, "strategy.name=fedit", "strategy.norm-bound=1"))
    assert "cannot bound the norm" in problems


def test_client_level_dp_refuses_strategies_without_a_bounded_sum():
    problems = "\n".join(_problems("privacy.client-dp=true", "strategy.name=fedex"))
    assert "cannot be combined with privacy.client-dp" in problems and "noised sum of bounded updates" in problems


def test_fedprox_works_under_dp_sgd_now_that_dp_wraps_the_one_training_loop():
    config = cfg.load_config(None, ["privacy.enabled=true", "strategy.name=fedprox"])
    assert config.strategy.name == "fedprox" and config.privacy.enabled


def test_attack_options_are_checked():
    problems = "\n".join(_problems("simulation.attack=flip-labels", "simulation.attack-sites=7"))
    assert "[7] not in 0..3" in problems
    assert "not one of" in _problems("simulation.attack=backdoor")[0]


def test_docs_table_is_the_generated_one():
    docs = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text()
    assert compatibility_table() in docs


def test_the_documented_new_strategy_is_one_file_and_one_registry_line(monkeypatch):
    """The example in docs/strategies.md, registered: its table parses, is checked and reaches it,
    and it composes like any other linear strategy (here under secure aggregation and client-level DP)."""
    docs = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text()
    code = docs.split("# fedlora/strategies/fedscaled.py\n", 1)[1].split("```", 1)[0]
    module = types.ModuleType("fedscaled")
    exec(compile(code, "fedscaled.py", "exec"), module.__dict__)  # noqa: S102 - the documented file
    monkeypatch.setitem(STRATEGIES, "fedscaled", module.FedScaled)  # the registry line
    config = cfg.load_config(None, ["strategy.name=fedscaled", "strategy.fedscaled.factor=2",
                                    "secagg.enabled=true", "federation.min-sites=3"])
    strategy = build_strategy(config)
    assert strategy.p.factor == 2.0 and "[strategy.fedscaled]" in cfg.describe_options()
    assert "strategy.fedscaled.factor: -1.0 must be > 0" in _problems("strategy.name=fedscaled",
                                                                      "strategy.fedscaled.factor=-1")
    g = {"w": np.zeros(2, np.float32)}
    new = strategy.aggregate(g, [SiteUpdate("a", 1.0, {"w": np.ones(2, np.float32)}),
                                 SiteUpdate("b", 3.0, {"w": np.full(2, 3.0, np.float32)})])
    assert np.allclose(new["w"], 2 * 2.5)
