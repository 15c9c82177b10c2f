"""The exported adapter is usable with plain PEFT, without fedlora: its base model is named as a
hub id or a model name (never a path of the training machine), its label names are in labels.json
(documented in its model card), and the card describes the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlora import config as cfg
from fedlora.data.labels import infer_labels
from fedlora.data.sites import central_test_rows
from fedlora.models import DEMO_HUB_ID, hub_base_name, load_model
from fedlora.server.warm_start import load_warm_start
from fedlora.simulations.inprocess import run_inprocess
from fedlora.tasks import build_task
from fedlora.training import predict_labels

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


def test_the_readme_script_names_labels_with_only_the_adapter_folder_and_the_base_model(run, tmp_path):
    """The README's plain-PEFT script, run as written in a fresh interpreter without fedlora on its path:
    the adapter folder and the base model (here a local folder, as the README says) are all it gets."""
    out, base_dir = run
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    script = readme.split("## Use the adapter without fedlora", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'adapter = "runs/x/adapter"' in script and "fedlora" not in script
    script = script.replace('"runs/x/adapter"', repr(str(out / "adapter")))
    script = script.replace('json.load(open(f"{adapter}/adapter_config.json"))["base_model_name_or_path"]',
                            repr(str(base_dir)))  # the base model's local folder, as the README allows
    (tmp_path / "use.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", str(tmp_path / "use.py")], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    names = cfg.load_config(out / "config.toml").task.labels
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.split(" <- ")[0] in names for line in lines)
    # the names are the adapter's predictions: fedlora's own loader and predictor say the same for those notes
    config = infer_labels(cfg.load_config(out / "config.toml"))
    task = build_task(config)
    loaded = load_model(config, task)
    load_warm_start(out, config, loaded.model)
    notes = [line.split(" <- ", 1)[1] for line in lines]
    examples = task.encode([{"text": n, "label": names[0]} for n in notes], loaded.tokenizer, 64)
    predicted = predict_labels(loaded.model, task, examples, loaded.tokenizer.pad_token_id)
    assert [line.split(" <- ")[0] for line in lines] == [names[i] for i in predicted]
