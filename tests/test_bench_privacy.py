"""The `privacy` suite of `fedlora bench`: its plans, the reuse of finished runs, the step-cost
measurement on tiny-bert, and the rendered section. The federated runs are faked or tiny."""

import json

import pytest

from fedlora import config as cfg
from fedlora.bench import engines
from fedlora.bench import privacy
from fedlora.bench.suite import BenchContext
from fedlora.data.labels import infer_labels


def _summary(epsilon, sigma=None):
    site_level = {"epsilon": epsilon, "delta": 1e-5 if epsilon else None,
                  "sites": {f"site-{k}": {"noise_multiplier": sigma} for k in range(2)} if sigma else {}}
    return {"rounds": 5, "final": {"test_accuracy": 0.2, "test_macro_f1": 0.067, "eval_accuracy": 0.25},
            "privacy": {"site_level": site_level}, "totals": {"seconds": 431.6}}


def test_full_mode_measures_what_benchmarks_md_quotes_and_quick_mode_is_small():
    default, larger = privacy.FULL.scenarios
    assert privacy.FULL.engine == "simulate" and default.sets == () and default.epsilons == (1.0, 3.0, 8.0)
    assert set(larger.sets) == {"data.records-per-site=2000", "privacy.batch-size=256"} and larger.epsilons == (8.0,)
    assert (privacy.FULL.step_batch, privacy.FULL.step_repeats, privacy.FULL.step_sets) == (64, 10, ())
    (quick,) = privacy.QUICK.scenarios
    assert privacy.QUICK.engine == "in-process" and "model.name=tiny-bert" in quick.sets
    assert privacy.QUICK.test_notes == 100 and quick.epsilons == (8.0,)
    for plan in (privacy.QUICK, privacy.FULL):  # every run's configuration is valid
        for scenario in plan.scenarios:
            for _, eps in privacy.run_names(scenario.epsilons):
                cfg.load_config(None, [*scenario.sets, *privacy.privacy_sets(eps)])


def test_runs_are_the_non_private_one_then_one_per_epsilon():
    assert privacy.run_names((1.0, 8.0)) == [("non-private", None), ("eps-1", 1.0), ("eps-8", 8.0)]
    assert privacy.privacy_sets(None) == []
    assert privacy.privacy_sets(3.0) == ["privacy.enabled=true", "privacy.epsilon=3"]


def test_a_utility_row_takes_the_largest_epsilon_spent_and_each_sigma_once():
    row = privacy.utility_row("eps-8", 8.0, _summary(7.96, sigma=1.2437))
    assert row["epsilon"] == 7.96 and row["sigma"] == [1.244] and row["seconds"] == 431.6
    assert privacy.utility_row("non-private", None, _summary(None))["sigma"] == []


def test_finished_runs_are_reused_and_unfinished_ones_started_over(tmp_path, monkeypatch):
    calls = []

    def engine(config, out):
        calls.append(out.name)
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps(_summary(7.9, sigma=0.9) if "eps" in out.name
                                                      else _summary(None)))
        return out

    monkeypatch.setitem(engines.ENGINES, "in-process", engine)
    scenario = privacy.Scenario("tiny", ("model.name=tiny-bert",), (8.0,))
    (tmp_path / "non-private").mkdir()
    (tmp_path / "non-private" / "summary.json").write_text(json.dumps(_summary(None)))  # finished before
    (tmp_path / "eps-8").mkdir()
    (tmp_path / "eps-8" / "metrics.jsonl").write_text("{}\n")  # interrupted
    rows = privacy.utility(scenario, "in-process", [], tmp_path, lambda items, label: items)
    assert calls == ["eps-8"] and not (tmp_path / "eps-8" / "metrics.jsonl").exists()
    assert [r["run"] for r in rows] == ["non-private", "eps-8"] and rows[1]["sigma"] == [0.9]


def test_step_cost_times_every_variant_on_the_same_batch():
    config = infer_labels(cfg.load_config(None, ["model.name=tiny-bert", "model.max-length=16"]))
    cost = privacy.step_cost(config, batch_size=4, repeats=1)
    assert set(cost["seconds"]) == {"plain", "dp-hooks", "dp-ghost", "dp-hooks, plain noise"}
    assert all(v > 0 for v in cost["seconds"].values())
    assert cost["ratio"]["plain"] == 1.0 and cost["batch"] == 4 and cost["max_length"] == 16
    assert cost["per_sample_grad_mib_hooks"] == pytest.approx(4 * cost["trainable_parameters"] * 4 / 2 ** 20)


FIGURES = {
    "engine": "simulate", "test_notes": 500,
    "step_cost": {"model": "minilm", "batch": 64, "max_length": 64, "trainable_parameters": 75653, "repeats": 10,
                  "seconds": {"plain": 0.913, "dp-hooks": 0.971, "dp-ghost": 1.377},
                  "ratio": {"plain": 1.0, "dp-hooks": 1.0635, "dp-ghost": 1.508}, "per_sample_grad_mib_hooks": 18.47},
    "utility": [{"caption": "default scenario", "sets": [],
                 "rows": [privacy.utility_row("non-private", None, _summary(None)),
                          privacy.utility_row("eps-8", 8.0, _summary(7.96, sigma=1.24))]}],
}


def test_section_has_a_utility_table_per_scenario_and_the_step_cost():
    text = privacy.render(FIGURES)
    for expected in ("#### Utility: default scenario", "`fedlora simulate` (Ray), the `fedlora simulate` defaults",
                     "| non-private | — | — | 0.200 | 0.067 | 0.250 | 5 | 431.6 |",
                     "| eps-8 | 8 / 7.96, 1e-05 | 1.24 | 0.200 |", "75,653 trainable parameters",
                     "| dp-hooks | 0.971 | 1.06 |", "| dp-ghost | 1.377 | 1.51 |", "18.5 MiB"):
        assert expected in text, expected


def test_quick_run_measures_the_step_and_both_runs(tmp_path, monkeypatch):
    """The whole quick suite, with the federated runs faked: the real step cost, one test file for every run."""
    runs = []

    def engine(config, out):
        runs.append((out.name, config))
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps(_summary(7.9, 0.9) if config.privacy.enabled
                                                      else _summary(None)))
        return out

    monkeypatch.setitem(engines.ENGINES, "in-process", engine)
    result = privacy.run(BenchContext(quick=True, workdir=tmp_path))
    assert [name for name, _ in runs] == ["non-private", "eps-8"]
    assert all(c.model.name == "tiny-bert" and c.data.test_path.endswith("test-100.jsonl") for _, c in runs)
    assert runs[1][1].privacy.epsilon == 8.0 and runs[1][1].privacy.batch_size == 16
    assert result.figures["step_cost"]["model"] == "tiny-bert" and result.figures["test_notes"] == 100
    assert "central test set of 100 notes" in result.markdown and result.notes
