"""Whole runs (ServerApp main + ClientApp over an in-process Grid, serialized messages) with the
strategies whose mechanics span both sides: base corrections, mixed ranks, kept B."""

import json

import pytest
import torch

from fedlora import config as cfg
from fedlora.data.sites import central_test_rows
from fedlora.models import load_base_model, load_tokenizer
from fedlora.server.rundir import RunDirectory
from fedlora.simulations.inprocess import run_inprocess
from fedlora.tasks import build_task

COMMON = ["model.name=tiny-bert", "federation.num-sites=2", "federation.rounds=2", "data.records-per-site=30",
          "train.local-steps=3", "train.learning-rate=0.05", "model.max-length=32"]


def _run(tmp_path, *sets):
    out = run_inprocess(cfg.load_config(None, [*COMMON, *sets]), tmp_path)
    return out, RunDirectory(out).read_metrics()


def test_flora_with_mixed_ranks_is_exact_and_its_export_reproduces_the_run(tmp_path):
    out, rows = _run(tmp_path, "strategy.name=flora", "simulation.site-ranks=8,4")
    assert all(r["aggregation_error"] <= 1e-5 for r in rows)
    assert rows[1]["bytes_down"] > rows[0]["bytes_down"]  # the correction travels, and grows
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] > 8  # rank extended by the folded correction
    # plain PEFT on a fresh base reproduces the coordinator's final predictions
    from peft import PeftModel

    config = cfg.load_config(out / "config.toml")
    task = build_task(config)
    tok = load_tokenizer("tiny-bert")
    base = load_base_model("tiny-bert", "SEQ_CLS", task.num_labels, tok, seed=config.model.seed)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    examples = task.encode(central_test_rows(config, task), tok, config.model.max_length)
    predicted = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    with torch.no_grad():
        batch = task.collate(examples, tok.pad_token_id)
        ours = [task.labels[i] for i in task.predict(model, batch).tolist()]
    assert ours == predicted


def test_fedsa_sends_no_b_and_fedit_reports_its_error(tmp_path):
    _, fedsa = _run(tmp_path / "fedsa", "strategy.name=fedsa")
    _, fedit = _run(tmp_path / "fedit", "strategy.name=fedit")
    assert all(r["aggregation_error"] is None for r in fedsa)
    assert all(r["aggregation_error"] > 1e-4 for r in fedit)
    assert fedsa[0]["bytes_up"] < 0.7 * fedit[0]["bytes_up"] and fedsa[0]["bytes_down"] < fedit[0]["bytes_down"]


@pytest.mark.parametrize("name", ["fedex", "ffa"])
def test_other_exact_strategies_stay_exact_in_a_run(tmp_path, name):
    _, rows = _run(tmp_path, f"strategy.name={name}", "simulation.site-ranks=8,4")
    assert all(r["aggregation_error"] <= 1e-5 for r in rows)
