"""Evaluation as a coordinator needs it: each site's own figures every round, and per-class precision,
recall, F1 and a confusion matrix pooled exactly over the sites' held-out rows."""

import json

import pytest
import torch

from fedlora import config as cfg
from fedlora.simulations.inprocess import run_inprocess
from fedlora.tasks.classification import ClassificationTask


def test_per_class_figures_and_confusion_come_from_the_pooled_counts():
    task = ClassificationTask("text", "label", ["a", "b", "c"])

    class Fixed(torch.nn.Module):  # predicts from a lookup: inputs 0..2 give class 0, 1, 1
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.nn.functional.one_hot(
                torch.tensor([0, 1, 1])[input_ids[:, 0]], 3).float()})

    batch = {"input_ids": torch.tensor([[0], [1], [2], [0]]), "attention_mask": torch.ones(4, 1),
             "labels": torch.tensor([0, 1, 2, 1])}
    counts = task.eval_counts(Fixed(), batch)
    details = task.details(counts)
    # true 0 -> 0; true 1 -> 1; true 2 -> 1; true 1 -> 0
    assert details["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 1, 0]]
    assert details["per_class"]["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert details["per_class"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert details["per_class"]["c"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted


def test_each_sites_figures_are_recorded_every_round_and_pool_to_the_federations(tiny_bert_dir, tmp_path):
    config = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', "model.max-length=32", "federation.num-sites=3",
                                    "federation.rounds=2", "data.records-per-site=30", "train.local-steps=2"])
    run = run_inprocess(config, tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        sites = row["eval_sites"]
        assert sorted(sites) == ["site-0", "site-1", "site-2"]
        total = sum(s["eval_count"] for s in sites.values())
        correct = sum(s["eval_accuracy"] * s["eval_count"] for s in sites.values())
        assert row["eval_accuracy"] == pytest.approx(correct / total)
        pooled = [[sum(s["eval_confusion"][i][j] for s in sites.values()) for j in range(5)] for i in range(5)]
        assert row["eval_confusion"] == pooled
        assert sum(pooled[i][i] for i in range(5)) == round(correct)
        for name, figures in row["eval_per_class"].items():
            i = list(row["eval_per_class"]).index(name)
            assert figures["support"] == sum(pooled[i])
    page = (run / "report.html").read_text()
    assert 'id="confusion"' in page and "Accuracy at each site" in page


def test_sites_evaluate_a_sample_every_k_rounds_and_all_of_them_in_the_last(tiny_bert_dir, tmp_path):
    """federation.fraction-evaluate and evaluate-every: a round's evaluation costs in the sites sampled; the
    last round still gives every site's own figures."""
    config = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', "model.max-length=32", "federation.num-sites=6",
                                    "federation.rounds=3", "data.records-per-site=20", "train.local-steps=1",
                                    "federation.fraction-evaluate=0.5", "federation.evaluate-every=2"])
    run = run_inprocess(config, tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    every = [f"site-{i}" for i in range(6)]
    assert "eval_accuracy" not in rows[0] and "eval_sites" not in rows[0] and "evaluated" not in rows[0]
    assert "test_accuracy" in rows[0]  # the coordinator's own test set still scores every round
    assert rows[1]["evaluated"] == 3 and len(rows[1]["eval_sites"]) == 3 and set(rows[1]["eval_sites"]) < set(every)
    assert rows[2]["evaluated"] == 6 and sorted(rows[2]["eval_sites"]) == every
    pooled = sum(s["eval_accuracy"] * s["eval_count"] for s in rows[1]["eval_sites"].values()) / \
        sum(s["eval_count"] for s in rows[1]["eval_sites"].values())
    assert rows[1]["eval_accuracy"] == pytest.approx(pooled)  # the pooled figure is over the sample
    # bytes: round 1 sent nothing to evaluate, round 2 half the sites' evaluation messages
    assert rows[0]["bytes_down"] < rows[1]["bytes_down"] < rows[2]["bytes_down"]


def test_a_run_that_stops_early_still_ends_with_every_sites_figures(tiny_bert_dir, tmp_path):
    """Sites out of DP-SGD budget end the run before its last round: the last row kept is re-evaluated at
    every site, so the run's final figures (summary, registry, model card) cover every site, not a sample."""
    config = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', "model.max-length=32", "federation.num-sites=4",
                                    "federation.rounds=4", "data.records-per-site=30", "train.local-steps=2",
                                    "federation.fraction-evaluate=0.5", "privacy.enabled=true",
                                    "privacy.noise-multiplier=1.5", "privacy.epsilon=3", "privacy.batch-size=8",
                                    "privacy.delta=1e-3"])
    run = run_inprocess(config, tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) < 4 and json.loads((run / "summary.json").read_text())["privacy"]["stopped"]  # it stopped
    assert all(r["evaluated"] == 2 for r in rows[:-1])  # a sample while it ran
    assert rows[-1]["evaluated"] == 4 and sorted(rows[-1]["eval_sites"]) == [f"site-{i}" for i in range(4)]
    assert [r["round"] for r in rows] == list(range(1, len(rows) + 1))  # the last row replaced, not repeated
