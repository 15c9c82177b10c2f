import os

import pytest

# Nothing in the tests may reach a hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny BERT classifier saved as a plain local model directory (weights + tokenizer)."""
    from fedlora.models import load_base_model, load_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert-local")
    tok = load_tokenizer("tiny-bert")
    model = load_base_model("tiny-bert", "SEQ_CLS", 5, tok, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
