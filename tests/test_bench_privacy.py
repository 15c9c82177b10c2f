"""The `privacy` suite of `fedlora bench`: its plans, the reuse of finished runs, the step-cost
measurement on tiny-bert, and the rendered section. The federated runs are faked or tiny."""

import json
import math

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
    assert privacy.privacy_sets(3.0) == ["privacy.enabled=true", "privacy.epsilon=3", "privacy.trainable=adapter"]


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


def test_client_level_example_reports_epsilon_with_and_without_amplification(tmp_path):
    """A real (small) client-level run: the unamplified epsilons against the Gaussian closed form."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def gaussian_epsilon(mu, delta):  # Balle & Wang 2018
        return brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 200)

    example = privacy.ClientLevel(sites=12, fraction=0.5, noise_multiplier=2.0, rounds=4)
    c = privacy.client_level(example, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "client-level" / "metrics.jsonl").read_text().splitlines()]
    assert c["rounds"] == 4 and c["average_site_rounds"] == sum(r["sites"] for r in rows) / 12
    assert c["epsilon_unamplified_average_site"] == pytest.approx(
        gaussian_epsilon(math.sqrt(round(c["average_site_rounds"])) / 2.0, c["delta"]), rel=1e-3)
    assert c["epsilon_unamplified_average_site"] <= c["epsilon_unamplified_most_sampled"]
    # amplification by the secret sample: below what a site sampled in every round would spend without it
    # (the average site's own figure depends on how often the draw picked it: 1 round in a few % of runs)
    assert c["epsilon"] < gaussian_epsilon(math.sqrt(example.rounds) / example.noise_multiplier, c["delta"])
    assert privacy.FULL.client_level == privacy.ClientLevel(200, 0.1, 1.68, 100)  # docs/privacy.md's example


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
    "client_level": {"sites": 200, "fraction": 0.1, "noise_multiplier": 1.68, "rounds": 100, "delta": 1e-5,
                     "epsilon": 2.996, "epsilon_unamplified_most_sampled": 15.2, "average_site_rounds": 10.05,
                     "epsilon_unamplified_average_site": 9.28},
}


def test_section_has_a_utility_table_per_scenario_and_the_step_cost():
    text = privacy.render(FIGURES)
    for expected in ("#### Utility: default scenario", "`fedlora simulate` (Ray), the `fedlora simulate` defaults",
                     "| non-private | — | — | 0.200 | 0.067 | 0.250 | 5 | 431.6 |",
                     "| eps-8 | 8 / 7.96, 1e-05 | 1.24 | 0.200 |", "75,653 trainable parameters",
                     "| dp-hooks | 0.971 | 1.06 |", "| dp-ghost | 1.377 | 1.51 |", "18.5 MiB",
                     "200 sites, each sampled with probability q = 0.1", "| reported (amplified by sampling at q) | 3.00 |",
                     "| without amplification, an average site (10.1 rounds) | 9.28 |"):
        assert expected in text, expected


def test_quick_run_measures_the_step_and_both_runs(tmp_path, monkeypatch):
    """The whole quick suite, with the federated runs faked: the real step cost, one test file for every run."""
    runs = []

    def engine(config, out):
        runs.append((out.name, config))
        out.mkdir(parents=True)
        summary = _summary(7.9, 0.9) if config.privacy.enabled else _summary(None)
        if config.privacy.client_dp:
            summary["privacy"]["client_level"] = {"epsilon": 1.0, "delta": 1e-5, "epsilon_unamplified": 5.0}
            (out / "metrics.jsonl").write_text('{"sites": 20}\n' * config.federation.rounds)
        (out / "summary.json").write_text(json.dumps(summary))
        return out

    monkeypatch.setitem(engines.ENGINES, "in-process", engine)
    result = privacy.run(BenchContext(quick=True, workdir=tmp_path))
    assert [name for name, _ in runs] == ["non-private", "eps-8", "client-level"]
    assert all(c.model.name == "tiny-bert" and c.data.test_path.endswith("test-100.jsonl") for _, c in runs[:2])
    assert runs[2][1].privacy.client_dp and runs[2][1].federation.num_sites == 200
    assert runs[1][1].privacy.epsilon == 8.0 and runs[1][1].privacy.batch_size == 16
    assert result.figures["step_cost"]["model"] == "tiny-bert" and result.figures["test_notes"] == 100
    assert "central test set of 100 notes" in result.markdown and result.notes
