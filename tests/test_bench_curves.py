"""The curves suite's parts: the stopping rule, centralized training scored round by round, the tables
and plots it writes, and the bench report that draws them (checked in headless Chromium)."""

import html
import json
import re

import pytest
from test_report_browser import PROBE, _browse, _chromium

from fedlora import config as cfg
from fedlora.bench import baselines, curves, report, runner
from fedlora.bench.baselines import centralized_curve, converged
from fedlora.bench.suite import SuiteResult
from fedlora.cli import main as fedlora_main
from fedlora.data import synthetic


def test_training_stops_after_patience_rounds_without_a_new_best():
    assert converged([0.5, 0.7, 0.6, 0.65, 0.9], patience=2) == (1, 3)   # stops before the late 0.9
    assert converged([0.5, 0.7, 0.6, 0.8], patience=2) == (3, 3)         # no stop: the last point
    assert converged([0.5, 0.5, 0.5], patience=1) == (0, 1)              # a tie is no new best
    assert converged([0.3], patience=3) == (0, 0)


def test_centralized_training_is_scored_every_round_of_the_federations_steps_until_it_converges(tiny_bert_dir,
                                                                                                 monkeypatch):
    config = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', "model.max-length=32", "federation.num-sites=2",
                                    "data.records-per-site=30", "train.local-steps=3",
                                    "task.labels=" + ",".join(synthetic.LABELS)])
    validation = iter([0.5, 0.6, 0.6, 0.55, 0.9, 0.9])  # a plateau after round 2, a late rise never reached
    score = baselines.Pooled.score

    def scripted(self, examples):
        scores = score(self, examples)  # really scored: the model is in the loop
        return {**scores, "test_accuracy": next(validation)} if examples is self.validation else scores

    monkeypatch.setattr(baselines.Pooled, "score", scripted)
    curve = centralized_curve(config, max_rounds=6, patience=2)
    assert curve["steps_per_round"] == 2 * 3  # two sites' local steps
    points = curve["rounds"]
    assert [p["round"] for p in points] == [1, 2, 3, 4]  # stopped 2 rounds after the best (a tie is no new best)
    assert [p["steps"] for p in points] == [6, 12, 18, 24]
    assert [p["validation_accuracy"] for p in points] == [0.5, 0.6, 0.6, 0.55] and curve["best_round"] == 2
    assert all(0 <= p["test_accuracy"] <= 1 for p in points)


def _figures() -> tuple[dict, list[dict], list[dict]]:
    fed = [{"round": r, "eval_accuracy": v, "test_accuracy": t, "test_macro_f1": t}
           for r, v, t in [(1, 0.5, 0.6), (2, 0.8, 0.9), (3, 0.7, 0.92), (4, 0.75, 0.93)]]
    central = [{"round": r, "steps": 10 * r, "validation_accuracy": v, "test_accuracy": t}
               for r, v, t in [(1, 0.7, 0.8), (2, 0.9, 0.95), (3, 0.85, 0.96)]]
    curve = {"federated": fed, "centralized": central, "steps_per_round": 10,
             "federated_converged": curves.at_convergence(fed, "eval_accuracy", 2),
             "centralized_converged": curves.at_convergence(central, "validation_accuracy", 1)}
    recipes = [{"recipe": "2 local epochs (the default)", "sets": [], "test_accuracy": 0.9, "per_seed": [0.89, 0.91],
                "seconds": 100.0}]
    eps = [{"records_per_site": 320, "target_epsilon": None, "epsilon": None, "test_accuracy": 0.9,
            "test_macro_f1": 0.9, "seconds": 1.0},
           {"records_per_site": 320, "target_epsilon": 1.0, "epsilon": 0.99, "test_accuracy": 0.3,
            "test_macro_f1": 0.2, "seconds": 1.0},
           {"records_per_site": 320, "target_epsilon": 8.0, "epsilon": 7.9, "test_accuracy": 0.45,
            "test_macro_f1": 0.4, "seconds": 1.0}]
    return curve, recipes, eps


def test_tables_compare_with_centralized_at_convergence_and_at_equal_compute():
    curve, recipes, eps = _figures()
    assert curve["federated_converged"] == {"round": 2, "test_accuracy": 0.9, "stopped_at": 4}
    assert curve["centralized_converged"] == {"round": 2, "test_accuracy": 0.95, "stopped_at": 3}
    text = curves.markdown(curve, recipes, eps, curves.FULL)
    assert "| federated at convergence | 2 | 0.900 | 0.947 |" in text          # 0.9 / 0.95
    assert "| federated after the default 5 rounds | 4 | 0.930 | 0.979 |" in text  # fewer rounds ran: the last
    assert "| 3 | 0.920 | 0.960 | 0.958 |" in text and "| 4 | 0.930 | – | – |" in text
    assert "| centralized, its best test round (chosen on the test set: an upper bound) | 3 | 0.960 | 1.011 |" in text
    assert "| federated, its best test round (the same) | 4 | 0.930 | 0.979 |" in text
    assert "| 2 local epochs (the default) | – | 0.900 | 0.890 / 0.910 | 0.947 | 100 |" in text
    assert "| 320 | 8 / 7.900 | 0.450 | 0.400 | 0.500 |" in text and "| 320 | non-private |" in text


def test_plots_draw_private_runs_by_epsilon_and_the_non_private_run_as_a_level_line():
    curve, _, eps = _figures()
    by_round, by_epsilon = curves.plots(curve, eps)
    assert by_round["series"]["federated"] == [[1, 0.6], [2, 0.9], [3, 0.92], [4, 0.93]]
    assert by_round["series"]["centralized"] == [[1, 0.8], [2, 0.95], [3, 0.96]]
    assert by_epsilon["series"] == {"320 records per site, DP-SGD": [[1.0, 0.3], [8.0, 0.45]],
                                    "320 records per site, non-private": [[1.0, 0.9], [8.0, 0.9]]}


@pytest.fixture()
def plotting_suite(monkeypatch):
    curve, _, eps = _figures()
    import sys
    import types
    module = types.ModuleType("fake_curves")
    module.NAME, module.TITLE = "curves", "Curves"
    module.run = lambda ctx: SuiteResult({"plots": curves.plots(curve, eps)}, "| a |\n|---|\n| 1 |")
    monkeypatch.setitem(sys.modules, "fake_curves", module)
    monkeypatch.setattr(runner, "SUITES", {"curves": "fake_curves"})


def test_the_runner_writes_every_suites_plots_into_the_bench_report_drawn_by_a_browser(plotting_suite, tmp_path,
                                                                                        monkeypatch):
    chromium = _chromium()
    monkeypatch.setenv("FEDLORA_NO_PROGRESS", "1")
    assert fedlora_main(["bench", "--quick", "--only", "curves", "--workdir", str(tmp_path / "w"),
                         "--markdown", str(tmp_path / "BENCHMARKS.md")]) == 0
    page = (tmp_path / "BENCHMARKS.quick.html").read_text()
    assert "<script" not in page.lower() and "fedlora bench --quick --only curves" in page
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(page + PROBE)
    dom = _browse(chromium, tmp_path, "--dump-dom", probe_page.as_uri()).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run; Chromium returned: {dom[:500]!r}"
    plots = {p["title"]: p for p in json.loads(html.unescape(found.group(1)))["plots"]}
    assert set(plots) == {"Test accuracy by round, at equal compute",
                          "Test accuracy against epsilon per site (DP-SGD)"}
    for plot in plots.values():
        assert plot["width"] > 0 and all(s["length"] > 0 for s in plot["series"]) and len(plot["series"]) == 2
    entries = json.loads((tmp_path / "BENCHMARKS.quick.json").read_text())["suites"]
    assert report.render({}) != report.render(entries)
