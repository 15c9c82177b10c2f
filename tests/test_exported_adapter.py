"""The exported adapter is usable with plain PEFT, without fedlora: its base model is named as a
hub id or a model name (never a path of the training machine), its label names are in labels.json
(documented in its model card), and the card describes the run."""

import json

import pytest
import torch

from fedlora import config as cfg
from fedlora.data.sites import central_test_rows
from fedlora.models import DEMO_HUB_ID, hub_base_name
from fedlora.simulations.inprocess import run_inprocess
from fedlora.tasks import build_task

TINY = ["model.max-length=16", "federation.num-sites=2", "federation.rounds=1", "data.records-per-site=12",
        "train.local-steps=1", "train.batch-size=4"]


@pytest.fixture(scope="module")
def run(tiny_bert_dir, tmp_path_factory):
    config = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', *TINY])
    return run_inprocess(config, tmp_path_factory.mktemp("run") / "run"), tiny_bert_dir


def test_base_model_names(tiny_bert_dir, tmp_path):
    assert hub_base_name("minilm") == DEMO_HUB_ID == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_base_name("tiny-bert") == "tiny-bert"
    assert hub_base_name("org/model") == "org/model"
    assert hub_base_name(str(tiny_bert_dir)) == tiny_bert_dir.name
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "org/fine-model"}))
    assert hub_base_name(str(tmp_path)) == "org/fine-model"


def test_exported_adapter_config_labels_and_card(run):
    out, base_dir = run
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_dir.name and "/" not in config["base_model_name_or_path"]
    labels = json.loads((adapter / "labels.json").read_text())
    names = [labels["id2label"][str(i)] for i in range(len(labels["id2label"]))]
    assert names == list(cfg.load_config(out / "config.toml").task.labels) and len(names) == 5
    assert labels["label2id"] == {n: i for i, n in enumerate(names)}
    card = (adapter / "README.md").read_text()
    assert "[More Information Needed]" not in card  # not PEFT's template
    assert card.startswith("---\nlibrary_name: \"peft\"\n") and f'base_model: "{base_dir.name}"' in card
    assert "Strategy: fedit" in card and "Rounds: 1" in card
    assert "none (differential privacy was off)" in card
    assert "labels.json" in card and "int(i)" in card and "PeftModel.from_pretrained" in card and "import fedlora" not in card
    for i, n in enumerate(names):
        assert f"{i}: {n}" in card


def test_plain_peft_loads_it_and_decodes_label_names(run):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, base_dir = run
    adapter = out / "adapter"
    labels = json.loads((adapter / "labels.json").read_text())
    id2label = {int(i): name for i, name in labels["id2label"].items()}  # as the model card says
    base = AutoModelForSequenceClassification.from_pretrained(str(base_dir), id2label=id2label,
                                                              label2id=labels["label2id"])
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    config = cfg.load_config(out / "config.toml")
    rows = central_test_rows(config, build_task(config))[:20]
    batch = tok([r["text"] for r in rows], return_tensors="pt", truncation=True, max_length=16, padding=True)
    with torch.no_grad():
        argmax = model(**batch).logits.argmax(-1).tolist()
    got = [base.config.id2label[i] for i in argmax]  # the documented mapping decodes an argmax to a name
    assert all(name in labels["label2id"] for name in got)
    expected = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert got == expected[:20]  # the coordinator's own predictions, reproduced without fedlora
