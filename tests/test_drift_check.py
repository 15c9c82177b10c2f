"""The coordinator's drift check (federation.drift-check): no site trains; each site that allows it
answers with aggregate drift figures against what it last trained on, and the run says whether
retraining is due, by the sites' thresholds or the consortium's schedule."""

import json

import pytest

from fedlora import config as cfg
from fedlora import wire
from fedlora.server import drift_check
from fedlora.simulations.inprocess import run_inprocess


def _answer(**figures) -> dict:
    metrics = {wire.DRIFT_HAS_SNAPSHOT: 1.0, wire.DRIFT_LABEL_PSI: 0.01, wire.DRIFT_LABEL_CHI2_P: 0.9,
               wire.DRIFT_TEXT_JS: 0.02, wire.DRIFT_UNSEEN_WORDS: 0.01, wire.DRIFT_DAYS: 10.0, wire.DRIFT_DUE: 0.0}
    metrics.update(figures)
    return drift_check.site_answer(metrics, "ab" * 32)


def test_due_when_a_site_says_so_or_its_training_is_older_than_the_schedule():
    answers = {"calm": _answer(), "drifted": _answer(**{wire.DRIFT_DUE: 1.0, wire.DRIFT_UNSEEN_WORDS: 0.3}),
               "old": _answer(**{wire.DRIFT_DAYS: 200.0}), "quiet": drift_check.site_answer(None, None),
               "new": drift_check.site_answer({wire.DRIFT_HAS_SNAPSHOT: 0.0}, None)}
    report = drift_check.assess(answers, retrain_after_days=182)
    assert report["retraining_due"] and report["due_at"] == ["drifted", "old"]
    assert report["sites"]["old"]["why"] == ["its last training was 200 days ago (schedule: every 182)"]
    assert report["sites"]["drifted"]["unseen_word_share"] == 0.3 and report["sites"]["drifted"]["snapshot"]
    assert not report["sites"]["calm"]["due"] and not report["sites"]["quiet"]["shared"]
    assert drift_check.assess(answers, retrain_after_days=0)["due_at"] == ["drifted"]  # figures only
    text = "\n".join(drift_check.lines(report))
    assert "quiet" in text and "does not share" in text and "has not trained yet" in text
    assert text.endswith("retraining due: yes, at drifted, old")


def test_a_site_that_did_not_answer_is_not_counted_as_fine():
    calm = {"calm": _answer(), "silent": dict(drift_check.FAILED)}
    report = drift_check.assess(calm, retrain_after_days=182)
    assert not report["retraining_due"] and report["not_checked"] == ["silent"]
    assert drift_check.exit_code(report) == 1  # the check could not cover every site
    assert "silent" in drift_check.lines(report)[-1] and "did not answer" in "\n".join(drift_check.lines(report))
    due = drift_check.assess({**calm, "drifted": _answer(**{wire.DRIFT_DUE: 1.0})}, retrain_after_days=182)
    assert drift_check.exit_code(due) == 3  # what is due comes first
    assert drift_check.exit_code(drift_check.assess({"calm": _answer()}, 182)) == 0


def test_a_figure_the_site_could_not_measure_is_none_not_minus_one():
    assert _answer(**{wire.DRIFT_LABEL_PSI: -1.0})["label_psi"] is None


def _settings(tiny_bert_dir, *more) -> list[str]:
    return [f'model.name="{tiny_bert_dir}"', "model.max-length=32", "federation.num-sites=2", "federation.rounds=1",
            "data.records-per-site=60", "train.local-steps=1", *more]


def test_a_drift_check_flags_the_site_whose_data_drifted_and_only_sites_that_share(tiny_bert_dir, tmp_path):
    # two sites with their own state folders (their snapshots outlive a run, as a deployed site's do);
    # only site 0 shares its drift figures
    nodes = [{"partition-id": i, "num-partitions": 2, "state-dir": str(tmp_path / f"state-{i}"),
              "share-drift": i == 0} for i in range(2)]
    run_inprocess(cfg.load_config(None, _settings(tiny_bert_dir)), tmp_path / "trained", node_configs=nodes)

    same = run_inprocess(cfg.load_config(None, _settings(tiny_bert_dir, "federation.drift-check=true")),
                         tmp_path / "check-same", node_configs=nodes)
    report = json.loads((same / drift_check.DRIFT_FILE).read_text())
    shared, quiet = report["sites"]["site-0"], next(s for name, s in report["sites"].items() if name != "site-0")
    assert shared["trained"] and not shared["due"] and shared["text_js"] == 0.0 and shared["unseen_word_share"] == 0
    assert quiet == {"shared": False, "due": False, "why": []}
    assert not (same / "metrics.jsonl").exists() and not report["retraining_due"]

    drifted = run_inprocess(cfg.load_config(None, _settings(tiny_bert_dir, "federation.drift-check=true",
                                                            'data.synthetic-variant="drifted"')),
                            tmp_path / "check-drifted", node_configs=nodes)
    report = json.loads((drifted / drift_check.DRIFT_FILE).read_text())
    site = report["sites"]["site-0"]
    assert report["retraining_due"] and report["due_at"] == ["site-0"] and site["why"] == ["its own thresholds say so"]
    assert site["unseen_word_share"] > 0.1 and site["text_js"] > shared["text_js"]
    assert site["snapshot"] == shared["snapshot"]  # the same training snapshot, compared with other data
    summary = json.loads((drifted / "summary.json").read_text())
    assert summary["rounds"] == 0 and summary["drift"] == report
    page = (drifted / "report.html").read_text()  # the coordinator reads it as it reads a run's report
    assert '<p id="drift-verdict">Retraining is due at site-0.</p>' in page and "does not share drift figures" in page


def test_a_drift_check_is_not_an_evaluation_too(tiny_bert_dir):
    with pytest.raises(cfg.ConfigError, match="a drift check or an evaluation"):
        cfg.load_config(None, _settings(tiny_bert_dir, "federation.drift-check=true", 'model.compare-with="x"',
                                        'model.warm-start="y"'))
