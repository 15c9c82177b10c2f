"""The `strategies` suite of `fedlora bench`: its cases (every one a valid configuration), the
summary of a run directory, one real attacked case in-process, and the rendered section."""

import json

import pytest

from fedlora import config as cfg
from fedlora.bench import engines
from fedlora.bench import strategies as st
from fedlora.simulations.launcher import SimulationFailed
from fedlora.strategies import STRATEGIES

ATTACKS = ("scale-update", "flip-labels")


def test_cases_cover_every_strategy_the_mixed_ranks_and_both_attacks():
    cases = st.cases(ATTACKS)
    by = {s: [c for c in cases if c.scenario == s] for s in st.SCENARIOS}
    assert [c.strategy for c in by["default"]] == list(STRATEGIES)
    assert {c.strategy for c in by["heterogeneous"]} == {"fedit", "ffa", "flora", "fedex", "fedsa"}
    assert len(by["poisoned"]) == 1 + len(ATTACKS) * len(st.ROBUST)
    assert st.FULL.attacks == ATTACKS and st.FULL.engine == "simulate" and st.FULL.sets == ()
    assert st.QUICK.engine == "in-process" and "model.name=tiny-bert" in st.QUICK.sets


@pytest.mark.parametrize("plan", [st.QUICK, st.FULL], ids=["quick", "full"])
def test_every_case_is_a_valid_configuration(plan):
    for case in st.cases(plan.attacks):
        config = cfg.load_config(None, [*plan.sets, *case.sets])
        assert config.strategy.name == case.strategy
        if case.scenario == "default" and "krum" in case.strategy:
            assert config.strategy.params[case.strategy].byzantine == 0  # f = 0: four sites allow no more


def test_case_folders_are_safe_names():
    case = st.Case("poisoned", "fedit + norm bound (2× median), scale-update", ("strategy.name=fedit",))
    assert case.folder == "fedit___norm_bound__2__median___scale-update" and case.strategy == "fedit"


def test_a_run_is_summarized_from_its_metrics(tmp_path):
    rows = [{"round": 1, "bytes_up": 100, "bytes_down": 300, "aggregation_error": 0.5, "round_seconds": 2.0,
             "test_accuracy": 0.4},
            {"round": 2, "bytes_up": 200, "bytes_down": 300, "aggregation_error": None, "round_seconds": 1.0,
             "test_accuracy": 0.6, "eval_accuracy": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = st.summarize(tmp_path)
    assert s["test_accuracy"] == 0.6 and s["eval_accuracy"] == 0.7 and s["test_macro_f1"] is None
    assert s["bytes_up_per_round"] == 150 and s["aggregation_error_max"] == 0.5
    assert s["rounds"] == 2 and s["seconds"] == 3.0


def test_a_refused_case_is_reported_and_the_others_kept(tmp_path, monkeypatch):
    def engine(config, out):
        raise SimulationFailed("no such thing")

    monkeypatch.setitem(engines.ENGINES, "in-process", engine)
    row = st.run_case(st.Case("default", "fedit", ("strategy.name=fedit",)), st.QUICK, tmp_path)
    assert row["error"] == "no such thing" and row["strategy"] == "fedit"
    text = st.render([row], [], "in-process")
    assert "Failed: fedit: no such thing" in text


def test_one_attacked_case_runs_in_process_and_is_reused(tmp_path, monkeypatch):
    case = next(c for c in st.cases(("scale-update",)) if c.label == "median, scale-update")
    plan = st.Plan(sets=(*st.QUICK.sets, "federation.rounds=1", "data.records-per-site=12"), attacks=(),
                   engine="in-process")
    row = st.run_case(case, plan, tmp_path)
    assert "error" not in row and row["rounds"] == 1 and 0 <= row["test_accuracy"] <= 1
    assert (tmp_path / "poisoned" / case.folder / "summary.json").exists()
    monkeypatch.setitem(engines.ENGINES, "in-process", lambda config, out: pytest.fail("a finished run was rerun"))
    assert st.run_case(case, plan, tmp_path) == row


def test_section_has_a_table_per_scenario():
    row = {"scenario": "heterogeneous", "case": "flora ranks 8,4,4,2", "strategy": "flora", "test_accuracy": 0.876,
           "test_macro_f1": 0.855, "eval_accuracy": 0.902, "bytes_up_per_round": 717296.0,
           "bytes_down_per_round": 15767734.0, "aggregation_error_max": 5.02e-17}
    text = st.render([row], [], "simulate")
    assert "#### Heterogeneous ranks (site ranks 8,4,4,2)" in text and "#### Default scenario" not in text
    assert "| flora ranks 8,4,4,2 | 0.876 | 0.855 | 0.902 | 717,296 | 15,767,734 | 5.02e-17 |" in text
    assert "`fedlora simulate` (Ray), the `fedlora simulate` defaults" in text
