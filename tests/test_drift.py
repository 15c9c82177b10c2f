"""Drift at a site: the statistics, the drifted corpus, the training snapshot a site keeps, the
`fedlora site drift` check, the drift query a site answers only when it allows it, and the cycle
the feature exists for: a model trained on the original corpus loses accuracy on drifted data, the
site's check says retraining is due, and a warm-started retraining on the drifted data recovers."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from scipy import stats
from scipy.spatial.distance import jensenshannon

from fedlora import config as cfg
from fedlora import wire
from fedlora.bench import drift as bench
from fedlora.cli import main as fedlora_main
from fedlora.client import drift as site_state
from fedlora.client.app import app as site_app
from fedlora.data import drift, synthetic
from fedlora.deploy import site_drift
from fedlora.simulations.inprocess import InProcessGrid, run_inprocess

# -- statistics against closed forms -------------------------------------------------------------


def test_psi_of_known_distributions():
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5) = 0.25 ln 2 + 0.25 ln 1.5 = 0.25 ln 3
    assert drift.psi({"a": 50, "b": 50}, {"a": 25, "b": 75}) == pytest.approx(0.25 * math.log(3))
    assert drift.psi({"a": 0.5, "b": 0.5}, {"a": 0.25, "b": 0.75}) == pytest.approx(0.25 * math.log(3))  # shares too
    assert drift.psi({"a": 3, "b": 7}, {"a": 30, "b": 70}) == 0.0
    assert drift.psi({"a": 1, "b": 2}, {"b": 2, "a": 1}) == 0.0  # order of categories is irrelevant
    e, a = {"a": 10, "b": 30, "c": 60}, {"a": 40, "b": 40, "c": 20}
    assert drift.psi(e, a) == pytest.approx(drift.psi(a, e))  # symmetric
    # a category absent on one side counts as the floor share: finite, and large
    assert drift.psi({"a": 1, "b": 1}, {"a": 1}) == pytest.approx(
        (1 - 0.5) * math.log(1 / 0.5) + (drift.PSI_FLOOR - 0.5) * math.log(drift.PSI_FLOOR / 0.5))


def test_chi_square_is_scipys_test_of_homogeneity():
    first, second = {"a": 30, "b": 50, "c": 20}, {"a": 10, "b": 60, "c": 45, "d": 5}
    ours = drift.chi_square(first, second)
    statistic, p, dof, _ = stats.chi2_contingency([[30, 50, 20, 0], [10, 60, 45, 5]], correction=False)
    assert ours.statistic == pytest.approx(statistic) and ours.p_value == pytest.approx(p) and ours.dof == dof
    same = drift.chi_square({"a": 5, "b": 10}, {"a": 50, "b": 100})
    assert same.statistic == pytest.approx(0.0) and same.p_value == pytest.approx(1.0)
    assert drift.chi_square({"a": 5}, {"a": 9}) == drift.ChiSquare(0.0, 0, 1.0)  # one category: nothing to test


def test_jensen_shannon_divergence_known_values():
    assert drift.js_divergence({"x": 2, "y": 6}, {"x": 1, "y": 3}) == pytest.approx(0.0, abs=1e-12)
    assert drift.js_divergence({"x": 1}, {"y": 1}) == pytest.approx(1.0)  # disjoint: the maximum in base 2
    # P = (1, 0), Q = (1/2, 1/2), M = (3/4, 1/4): JS = 1/2 log2(4/3) + 1/4 log2(2/3) + 1/4 log2(2)
    expected = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25
    assert drift.js_divergence({"x": 1}, {"x": 1, "y": 1}) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    p, q = rng.random(20), rng.random(20)
    keys = [f"w{i}" for i in range(20)]
    ours = drift.js_divergence(dict(zip(keys, p)), dict(zip(keys, q)))
    assert ours == pytest.approx(jensenshannon(p, q, base=2) ** 2)  # scipy returns the distance, its square root


def test_unseen_word_share_and_words():
    assert drift.words("Pt c/o SOB, 3 days; can't sleep") == ["pt", "c", "o", "sob", "days", "can't", "sleep"]
    assert drift.unseen_share({"a": 5, "b": 1}, {"a": 3, "c": 1}) == pytest.approx(0.25)
    assert drift.unseen_share({"a": 1}, {}) == 0.0


def test_identical_data_show_no_drift_and_no_retraining():
    rows = synthetic.site_records(0, 3, 200, seed=0)
    figures = drift.compare(drift.profile(rows), drift.profile(list(reversed(rows))))
    assert figures.label_psi == 0.0 and figures.text_js == pytest.approx(0.0, abs=1e-12)
    assert figures.unseen_word_share == 0.0 and figures.label_chi2_p == pytest.approx(1.0)
    verdict = drift.verdict(figures, accuracy_then=0.9, accuracy_now=0.9, age_days=10)
    assert not verdict.due and verdict.line().startswith("retraining due: no, because")


def test_a_small_samples_noisy_label_mix_is_not_a_shift_unless_significant():
    figures = drift.Figures(label_psi=0.3, label_chi2=3.0, label_chi2_dof=4, label_chi2_p=0.5, text_js=0.0,
                            unseen_word_share=0.0, records_then=30, records_now=30)
    assert not drift.verdict(figures).due
    assert drift.verdict(drift.Figures(0.3, 30.0, 4, 1e-5, 0.0, 0.0, 300, 300)).due


# -- the drifted corpus ----------------------------------------------------------------------------

def _vocabulary(rows) -> set[str]:
    return {w for r in rows for w in drift.words(r["text"])}


def test_the_drifted_corpus_has_new_words_a_new_template_and_a_shifted_label_mix():
    original = [r for site in range(3) for r in synthetic.site_records(site, 3, 300, seed=0)]
    drifted = [r for site in range(3) for r in synthetic.drifted_site_records(site, 3, 300, seed=0)]
    new_words = _vocabulary(drifted) - _vocabulary(original + synthetic.central_test_records(1000))
    assert {"nstemi", "aphasia", "sciatica", "hematochezia", "aecopd", "telehealth", "referral"} <= new_words
    assert sum("Telehealth video consult" in r["text"] for r in drifted) / len(drifted) == pytest.approx(
        synthetic.TELEHEALTH, abs=0.05)
    assert not any("Telehealth" in r["text"] for r in original)

    def share(rows, labels=("neurology", "pulmonology")):
        return sum(r["label"] in labels for r in rows) / len(rows)

    assert share(drifted) > share(original) + 0.15
    figures = drift.compare(drift.profile(original), drift.profile(drifted))
    assert figures.label_psi >= 0.2 and figures.unseen_word_share >= 0.2 and figures.text_js >= 0.2
    assert {r["label"] for r in drifted} == set(synthetic.LABELS)  # the same five departments


def test_the_drifted_corpus_is_deterministic_and_the_original_unchanged():
    assert synthetic.drifted_site_records(1, 3, 50, seed=4) == synthetic.drifted_site_records(1, 3, 50, seed=4)
    assert synthetic.drifted_site_records(1, 3, 50, seed=4) != synthetic.drifted_site_records(1, 3, 50, seed=5)
    assert synthetic.drifted_test_records(40) == synthetic.drifted_test_records(40)
    assert synthetic.records("original", 1, 3, 50, 4) == synthetic.site_records(1, 3, 50, 4)
    test = synthetic.drifted_test_records(500)
    assert [r["label"] for r in test[:5]] == synthetic.LABELS  # balanced, like the original's test set
    with pytest.raises(ValueError, match="unknown corpus variant"):
        synthetic.records("later", 0, 3, 5)


def test_the_variant_is_a_checked_configuration_key_and_a_sample_data_flag(tmp_path, capsys):
    assert cfg.load_config(None, ["data.synthetic-variant=drifted"]).data.synthetic_variant == "drifted"
    with pytest.raises(cfg.ConfigError, match="data.synthetic-variant: 'later' is not one of original, drifted"):
        cfg.load_config(None, ["data.synthetic-variant=later"])
    with pytest.raises(cfg.ConfigError, match="applies to the built-in synthetic corpus"):
        cfg.load_config(None, ["data.synthetic-variant=drifted", f"data.path={tmp_path / 'a.jsonl'}"])
    out = tmp_path / "drifted.jsonl"
    assert fedlora_main(["site", "sample-data", str(out), "--site", "1", "--sites", "3", "--records", "30",
                         "--drifted"]) == 0
    assert [json.loads(x) for x in out.read_text().splitlines()] == synthetic.drifted_site_records(1, 3, 30, seed=0)
    assert "wrote 30 drifted synthetic notes" in capsys.readouterr().out


# -- the snapshot a site keeps, and its digest ---------------------------------------------------

def test_the_training_snapshot_is_aggregate_private_and_named_by_a_keyed_digest(tmp_path):
    rows = synthetic.site_records(0, 3, 60, seed=0)
    snapshot = site_state.record_training(tmp_path, rows, "text", "label")
    assert set(snapshot) == {"version", "trained_at", "records", "label_counts", "word_counts"}
    assert snapshot["records"] == 60 and sum(snapshot["label_counts"].values()) == 60
    assert (tmp_path / site_state.SNAPSHOT_FILE).stat().st_mode & 0o777 == 0o600
    site_state.record_accuracy(tmp_path, 7, 10)
    assert site_state.load_snapshot(tmp_path)["accuracy"] == 0.7
    site_state.record_training(tmp_path, rows, "text", "label")   # the same data again: the accuracy stays
    assert site_state.load_snapshot(tmp_path)["accuracy"] == 0.7
    first = site_state.snapshot_digest(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{64}", first) and (tmp_path / site_state.KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert site_state.snapshot_digest(tmp_path) == first  # stable while the data are
    # keyed: the same statistics under another site's key give another digest (no guess can be tested)
    assert site_state.digest(snapshot, b"another site's key") != first
    site_state.record_training(tmp_path, rows[:-1], "text", "label")  # other data: another model's accuracy goes
    assert "accuracy" not in site_state.load_snapshot(tmp_path) and site_state.snapshot_digest(tmp_path) != first


def test_site_drift_reads_the_site_folder_and_exits_3_only_when_retraining_is_due(tmp_path, capsys):
    data, state = tmp_path / "notes.jsonl", tmp_path / "state"
    (tmp_path / "site.toml").write_text(f'[site]\nname = "hospital-a"\nsuperlink = "fl.example.org:9092"\n'
                                        f'[node-config]\nsite = "hospital-a"\ndata-path = "{data}"\n'
                                        f'state-dir = "{state}"\n')
    original = synthetic.site_records(0, 3, 400, seed=0)
    data.write_text("".join(json.dumps(r) + "\n" for r in original[200:]))  # new records, same corpus
    assert fedlora_main(["site", "drift", "--dir", str(tmp_path)]) == 1   # it never trained: nothing to compare
    assert "no training snapshot" in capsys.readouterr().err
    site_state.record_training(state, original[:200], "text", "label")
    assert fedlora_main(["site", "drift", "--dir", str(tmp_path)]) == 0
    assert "retraining due: no, because" in capsys.readouterr().out
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic.drifted_site_records(0, 3, 200, seed=0)))
    assert fedlora_main(["site", "drift", "--dir", str(tmp_path)]) == 3
    assert "retraining due: yes, because" in capsys.readouterr().out
    # thresholds are the operator's: raised out of reach, the same data are no longer a reason
    assert fedlora_main(["site", "drift", "--dir", str(tmp_path), "--psi", "9", "--js", "1.1", "--unseen", "1.1"]) == 0


# -- the cycle: train, drift, check, retrain -----------------------------------------------------

SITES, RECORDS = 2, 150


def _settings(tiny_bert_dir) -> list[str]:
    # A random tiny BERT learns this task only when LoRA also adapts its word embeddings (a bag of words,
    # in effect): then it reaches about 0.5 on the original test set in two rounds, which is enough to
    # see what drift takes away and what retraining gives back.
    return [f'model.name="{tiny_bert_dir}"', "model.max-length=48", f"federation.num-sites={SITES}",
            "federation.rounds=2", f"data.records-per-site={RECORDS}", "data.partition=iid",
            "train.local-steps=40", "train.learning-rate=0.008", "lora.target-modules=query,value,word_embeddings"]


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("drift")
    first = run_inprocess(cfg.load_config(None, _settings(tiny_bert_dir)), out / "first")
    second = run_inprocess(cfg.load_config(None, [*_settings(tiny_bert_dir), f'model.warm-start="{first}"',
                                                  "data.synthetic-variant=drifted"]), out / "second")
    return first, second, out


def _last(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def test_drift_costs_accuracy_the_site_says_so_and_warm_started_retraining_recovers(runs, capsys):
    first, second, out = runs
    trained = _last(first)["test_accuracy"]                                 # original test set
    stale = json.loads((second / "summary.json").read_text())["warm_start"]["test_accuracy"]  # drifted test set
    retrained = _last(second)["test_accuracy"]                              # drifted test set
    assert trained >= 0.4                      # it learned (chance is 0.2) ...
    assert stale <= trained - 0.1              # ... the drift took a good part of it away ...
    assert retrained >= stale + 0.1            # ... and retraining on the drifted data gave it back
    assert retrained >= trained - 0.05

    # The site's own check: its data file now holds drifted notes; its snapshot is the first run's training.
    data = out / "site-0-now.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic.drifted_site_records(0, SITES, RECORDS, 0, None)))
    state = first / "sites" / "site-0"
    assert site_state.load_snapshot(state)["accuracy"] > 0.3  # the site recorded its accuracy at training
    report = site_drift.check(data, state, adapter=first)
    assert report.verdict.due
    assert {"wording", "unseen_words", "accuracy"} <= set(report.upstream()["triggers"])
    assert report.accuracy.now <= report.accuracy.then - 0.05
    assert report.accuracy.now == pytest.approx(stale, abs=0.12)  # the central drifted test set agrees

    # The command: exit 3 (retraining due), figures and verdict printed, JSON of aggregate figures only.
    summary = out / "drift.json"
    code = fedlora_main(["site", "drift", "--data", str(data), "--state", str(state), "--adapter", str(first),
                         "--json", str(summary)])
    printed = capsys.readouterr().out
    assert code == drift.DUE_EXIT == 3 and "retraining due: yes, because" in printed
    upstream = json.loads(summary.read_text())
    assert upstream["retraining_due"] is True and upstream["snapshot_digest"] == report.digest
    _assert_nothing_from_the_records(summary.read_text(), data)

    # After retraining the site's snapshot is the drifted data, and the new adapter holds up on it.
    after = site_drift.check(data, second / "sites" / "site-0", adapter=second)
    assert after.figures.text_js == pytest.approx(0.0, abs=1e-12) and after.figures.unseen_word_share == 0.0
    assert not after.verdict.due, after.verdict.line()
    assert after.accuracy.now >= report.accuracy.now + 0.1
    assert fedlora_main(["site", "drift", "--data", str(data), "--state", str(second / "sites" / "site-0")]) == 0


def _assert_nothing_from_the_records(text: str, data) -> None:
    """Numbers only, apart from the keyed digest and the names of the thresholds crossed: no label,
    no word of the notes, no local path."""
    doc = json.loads(text)
    assert re.fullmatch(r"[0-9a-f]{64}", doc.pop("snapshot_digest"))
    assert set(doc.pop("triggers")) <= {"label_mix", "wording", "unseen_words", "accuracy", "age"}

    def leaves(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from leaves(v)
        else:
            yield value

    assert all(v is None or isinstance(v, (bool, int, float)) for v in leaves(doc))
    assert not any(label in text for label in synthetic.LABELS) and str(data.parent) not in text


# -- the drift query -------------------------------------------------------------------------------

def _ask(run, share: bool | None) -> list[Message]:
    flat = cfg.load_config(run / "config.toml").to_flat()
    extra = {} if share is None else {site_state.NODE_SHARE_DRIFT: share}
    grid = InProcessGrid(site_app, flat, SITES,
                         node_configs=[{"partition-id": i, "num-partitions": SITES, **extra} for i in range(SITES)])
    messages = [Message(RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}), dst_node_id=node,
                        message_type=f"query.{wire.DRIFT_QUERY}") for node in grid.get_node_ids()]
    return list(grid.send_and_receive(messages))


def test_the_drift_query_is_answered_only_where_the_site_allows_it_and_holds_no_words_or_labels(runs):
    first, _, _ = runs
    for share in (None, False):
        replies = _ask(first, share)
        assert all(r.has_error() and r.error.code == wire.DRIFT_NOT_SHARED for r in replies)
    replies = _ask(first, True)
    assert len(replies) == SITES and not any(r.has_error() for r in replies)
    for reply in replies:
        figures = dict(reply.content.metric_records[wire.DRIFT])
        assert set(figures) == {wire.DRIFT_HAS_SNAPSHOT, wire.DRIFT_LABEL_PSI, wire.DRIFT_LABEL_CHI2_P,
                                wire.DRIFT_TEXT_JS, wire.DRIFT_UNSEEN_WORDS, wire.DRIFT_DAYS, wire.DRIFT_DUE}
        # the same data it trained on: no drift; figures rounded; no record count among them
        assert figures[wire.DRIFT_HAS_SNAPSHOT] == 1.0 and figures[wire.DRIFT_DUE] == 0.0
        assert figures[wire.DRIFT_TEXT_JS] == 0.0 and figures[wire.DRIFT_UNSEEN_WORDS] == 0.0
        assert all(round(v, site_state.SHARED_DIGITS) == v for v in figures.values())
        digest = reply.content.config_records[wire.DRIFT_SNAPSHOT][wire.DRIFT_DIGEST]
        assert re.fullmatch(r"[0-9a-f]{64}", digest)
        assert set(reply.content.keys()) <= {wire.DRIFT, wire.DRIFT_SNAPSHOT, wire.SITE}  # and who answered
        if wire.SITE in reply.content:
            assert set(reply.content.config_records[wire.SITE]) == {wire.SITE_NAME, wire.SKIPPED_ROWS}
    assert {r.content.config_records[wire.DRIFT_SNAPSHOT][wire.DRIFT_DIGEST] for r in replies} == {
        site_state.snapshot_digest(first / "sites" / f"site-{i}") for i in range(SITES)}


def test_a_deployed_site_reports_a_label_the_run_never_listed_without_loading_a_model(tmp_path):
    """The drift a check exists for: a new department in the site's file. The site answers from its file
    as it is; the rows are not checked against the run's labels (which would refuse the new ones), and
    no model is loaded (model.name names none here)."""
    data, state = tmp_path / "notes.jsonl", tmp_path / "state"
    trained = [r for r in synthetic.site_records(0, 3, 300, seed=0) if r["label"] != synthetic.LABELS[-1]]
    site_state.record_training(state, trained, "text", "label")
    newcomers = [r for r in synthetic.site_records(1, 3, 300, seed=1) if r["label"] == synthetic.LABELS[-1]]
    data.write_text("".join(json.dumps(r) + "\n" for r in trained + newcomers))
    run_config = cfg.load_config(None, [f"task.labels={json.dumps(synthetic.LABELS[:-1])}",
                                        'model.name="/nonexistent/model"']).to_flat()
    node = {"site": "hospital-a", "data-path": str(data), "state-dir": str(state), site_state.NODE_SHARE_DRIFT: True}

    grid = InProcessGrid(site_app, run_config, 1, node_configs=[node])  # the site's real ClientApp
    messages = [Message(RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 0})}), dst_node_id=n,
                        message_type=f"query.{wire.DRIFT_QUERY}") for n in grid.get_node_ids()]
    (reply,) = grid.send_and_receive(messages)
    assert not reply.has_error()
    figures = reply.content.metric_records[wire.DRIFT]
    assert figures[wire.DRIFT_HAS_SNAPSHOT] == 1.0 and figures[wire.DRIFT_DUE] == 1.0
    assert figures[wire.DRIFT_LABEL_PSI] > drift.Thresholds().psi
    assert reply.content.config_records[wire.SITE][wire.SITE_NAME] == "hospital-a"


def test_a_site_that_never_trained_answers_without_figures():
    assert site_state.answer(None, drift.profile([{"text": "cough", "label": "pulmonology"}])) == {
        wire.DRIFT_HAS_SNAPSHOT: 0.0}


def test_the_drift_benchmark_section_renders_its_figures():
    sites = [{"site": 0, "data": kind, "retraining_due": kind == "drifted", "triggers": ["wording"] * (kind == "drifted"),
              "label_psi": 0.4, "label_chi2_p": 1e-5, "text_js": 0.3, "unseen_word_share": 0.5,
              "accuracy_now": 0.3, "accuracy_then": 0.5} for kind in ("drifted", "control")]
    figures = {"original_on_original": 0.9, "original_on_drifted": 0.5, "retrained_on_drifted": [0.8, 0.88],
               "retrained_on_original": 0.86, "cold_on_drifted": [0.4, 0.7, 0.9], "sites": sites}
    text = bench.markdown(figures, bench.QUICK)
    assert "| trained on the original (2 rounds) | 0.900 | 0.500 |" in text
    assert "| 2 | 0.880 | 0.700 |" in text and "in round 3." in text
    assert "| 0 | control |" in text and "| yes | wording |" in text
    assert bench.plots(figures)[0]["series"]["warm start"] == [[0, 0.5], [1, 0.8], [2, 0.88]]
