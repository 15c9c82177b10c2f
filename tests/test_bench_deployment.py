"""The `deployment` suite of `fedlora bench`: what it reads from the sites' timings, its summary,
reusing a finished deployment and the rendered section (the deployment itself takes minutes)."""

import json
import math

from fedlora.bench import deployment as dep
from fedlora.bench.suite import BenchContext

TIMINGS = [  # one site, two rounds, a train and an evaluate message each (cold: every message loads),
    # and the forecast query before round one (a site without DP answers it without loading anything)
    {"round": 1, "type": "query", "process_seconds": 5.0, "import_seconds": 8.0, "load_seconds": 0.0,
     "handler_seconds": 0.5},
    {"round": 1, "type": "train", "process_seconds": 5.0, "import_seconds": 8.0, "load_seconds": 6.0,
     "train_seconds": 20.0, "handler_seconds": 21.0},
    {"round": 1, "type": "evaluate", "process_seconds": 5.0, "import_seconds": 8.0, "load_seconds": 6.0,
     "handler_seconds": 2.0},
    {"round": 2, "type": "train", "process_seconds": 4.0, "load_seconds": 0.0, "train_seconds": 18.0,
     "handler_seconds": 18.5},
    {"round": 2, "type": "evaluate", "process_seconds": 4.0, "load_seconds": 0.0, "handler_seconds": 1.5},
]


def test_site_rounds_split_loading_training_and_evaluation():
    rounds = dep._site_rounds(TIMINGS)
    assert rounds[1] == {"overhead": 51.5, "train": 20.0, "evaluate": 2.0}
    assert rounds[2] == {"overhead": 8.0, "train": 18.0, "evaluate": 1.5}  # no imports: a worker answered


def test_summary_separates_the_first_round_from_the_later_ones():
    result = {"sites": {"site1": dep._site_rounds(TIMINGS)},
              "rounds": [{"round_seconds": 90.0}, {"round_seconds": 40.0}, {"round_seconds": 50.0}]}
    s = dep.summarize(result)
    assert (s["overhead_round1"], s["overhead_later"], s["train"], s["evaluate"]) == (51.5, 8.0, 19.0, 1.75)
    assert s["round_seconds"] == 60.0 and s["round_seconds_later"] == 45.0
    one_round = dep.summarize({"sites": {"site1": {1: dep._site_rounds(TIMINGS)[1]}},
                               "rounds": [{"round_seconds": 90.0}]})
    assert math.isnan(one_round["overhead_later"]) and math.isnan(one_round["round_seconds_later"])


def test_plans():
    assert (dep.FULL.sites, dep.FULL.rounds, dep.FULL.model, dep.FULL.records) == (3, 3, "minilm", 320)
    assert dep.QUICK.model == "tiny-bert" and dep.QUICK.rounds >= 2  # later rounds exist to compare


def test_a_finished_deployment_is_reused_without_starting_one(tmp_path, monkeypatch):
    root = tmp_path / "quick" / dep.NAME
    for mode in dep.MODES:
        (root / mode).mkdir(parents=True)
        saved = {"mode": mode, "rounds": [{"round_seconds": 9.0}, {"round_seconds": 4.0}],
                 "sites": {"site1": dep._site_rounds(TIMINGS)}}
        (root / mode / "result.json").write_text(json.dumps(saved))

    def no_deployment(*args):
        raise AssertionError("a finished deployment was run again")

    monkeypatch.setattr(dep, "run_mode", no_deployment)
    result = dep.run(BenchContext(quick=True, workdir=tmp_path / "quick"))
    assert result.figures["summaries"]["worker"]["overhead_later"] == 8.0  # round keys are ints again
    assert "| cold (Python proxy) | 51.5 | 8.0 | 19.0 | 4.0 |" in result.markdown
    assert "| worker (nginx) | 51.5 |" in result.markdown and "nginx takes 1.00×" in result.markdown
    assert "tiny-bert + LoRA, 40 synthetic notes per site, 2 rounds" in result.markdown


def test_an_unfinished_deployment_starts_over_in_a_fresh_folder(tmp_path, monkeypatch):
    stale = tmp_path / "cold" / "coordinator"
    stale.mkdir(parents=True)
    seen = []

    def run_mode(mode, root, plan):
        seen.append((mode, stale.exists()))
        return {"mode": mode, "rounds": [], "sites": {"site1": {1: {"overhead": 1.0, "train": 2.0, "evaluate": 0.5}}}}

    monkeypatch.setattr(dep, "run_mode", run_mode)
    result = dep.finished_mode("cold", tmp_path, dep.QUICK)
    assert seen == [("cold", False)] and result["sites"]["site1"][1]["train"] == 2.0
    assert (tmp_path / "cold" / "result.json").exists()
