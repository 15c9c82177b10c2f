"""End to end on Flower's real Simulation Engine (Ray): the run directory contract."""

import importlib.metadata
import json
import tomllib

import numpy as np
import pytest
import torch

from fedlora import config as cfg
from fedlora.simulations.launcher import simulate

pytestmark = pytest.mark.simulation

REQUIRED = {"round", "train_loss", "eval_loss", "eval_accuracy", "eval_macro_f1", "bytes_up", "bytes_down",
            "round_seconds", "train_seconds", "sites"}


@pytest.fixture(scope="module")
def classification_run(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', "model.max-length=32", "federation.num-sites=2",
                                    "federation.rounds=2", "data.records-per-site=40", "train.local-steps=3"])
    return simulate(config, out), config


def test_run_directory_is_complete(classification_run):
    out, config = classification_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert REQUIRED <= row.keys() and row["sites"] == 2
    resolved = cfg.from_nested(tomllib.loads((out / "config.toml").read_text()))
    assert resolved.federation.rounds == 2 and resolved.task.labels  # labels were filled in
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["parameters"]["adapter"] > 0
    assert set(summary["sites"]) == {"site-0", "site-1"}
    # The Simulation Engine's sites train on the synthetic corpus: its test set is the run's own.
    assert summary["central_test"]["set"] == "synthetic" and "test_accuracy" in rows[-1]
    assert summary["versions"]["torch"] == importlib.metadata.version("torch")  # what the result depends on
    assert {"python", "fedlora", "flwr", "transformers", "peft", "opacus"} <= summary["versions"].keys()
    assert (out / "checkpoints" / "latest").read_text().strip() == "round-0002"
    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}


def test_only_the_adapter_travels(classification_run):
    out, _ = classification_run
    summary = json.loads((out / "summary.json").read_text())
    adapter_bytes = 4 * summary["parameters"]["adapter"]
    base_bytes = 4 * summary["parameters"]["base"]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # Per round: each of 2 sites uploads one update; downloads are the train and evaluate messages.
    assert 2 * adapter_bytes <= row["bytes_up"] < 2 * adapter_bytes + 20_000
    assert 4 * adapter_bytes <= row["bytes_down"] < 4 * adapter_bytes + 40_000
    assert row["bytes_up"] < base_bytes / 10


def test_exported_adapter_reproduces_the_final_evaluation_with_plain_peft(classification_run, tiny_bert_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = classification_run
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    resolved = cfg.from_nested(tomllib.loads((out / "config.toml").read_text()))
    labels = resolved.task.labels
    from fedlora.data import synthetic

    rows = synthetic.central_test_records(seed=resolved.data.seed)
    assert len(preds) == len(rows)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        mine = []
        for i in range(0, len(rows), 100):
            enc = tok([r["text"] for r in rows[i:i + 100]], truncation=True, max_length=32, padding=True,
                      return_tensors="pt")
            mine += model(**enc).logits.argmax(-1).tolist()
    assert [labels[p] for p in mine] == [p["prediction"] for p in preds]
    summary = json.loads((out / "summary.json").read_text())
    accuracy = np.mean([labels[p] == r["label"] for p, r in zip(mine, rows)])
    assert accuracy == pytest.approx(summary["final"]["test_accuracy"], abs=1e-9)


def test_causal_lm_from_a_site_folder(tmp_path):
    sites = tmp_path / "sites"
    sites.mkdir()
    for name, word in (("hospital-a", "cardiology"), ("hospital-b", "neurology")):
        rows = [{"prompt": f"Note {i}: route this patient.", "completion": f"{word} {i % 3}"} for i in range(24)]
        (sites / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = cfg.load_config(None, ["model.name=tiny-llama", "task.type=causal-lm", f'data.path="{sites}"',
                                    "federation.num-sites=2", "federation.rounds=2", "train.local-steps=4",
                                    "train.learning-rate=0.01", "model.max-length=32"])
    out = simulate(config, tmp_path / "run")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("eval_perplexity" in r and np.isfinite(r["eval_perplexity"]) for r in rows)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] + 1e-6 or rows[-1]["train_loss"] < rows[0]["train_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sites"]) == {"hospital-a", "hospital-b"}
