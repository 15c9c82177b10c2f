import numpy as np
import pytest
import torch

from fedlora import config as cfg
from fedlora.models import (ModelLoadError, base_fingerprint, export_adapter, load_base_model, load_model,
                            load_tokenizer, set_trainable_state, trainable_state)
from fedlora.tasks import build_task


def _config(*sets):
    return cfg.load_config(None, ["model.name=tiny-bert", "task.labels=a,b,c,d,e", *sets])


def test_only_lora_factors_and_head_are_trainable_and_state_round_trips():
    c = _config()
    loaded = load_model(c, build_task(c))
    state = trainable_state(loaded.model)
    assert state and all(("lora_" in k) or ("classifier" in k) for k in state)
    changed = {k: v + 1.0 for k, v in state.items()}
    set_trainable_state(loaded.model, changed)
    again = trainable_state(loaded.model)
    assert all(np.array_equal(again[k], changed[k]) for k in state)


def test_state_with_wrong_names_or_shapes_is_refused():
    c = _config()
    model = load_model(c, build_task(c)).model
    state = trainable_state(model)
    name = next(iter(state))
    with pytest.raises(ValueError, match="mismatch"):
        set_trainable_state(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="shape"):
        set_trainable_state(model, {**state, name: np.zeros((1, 1), np.float32)})


def test_two_loads_share_base_weights_and_lora_defaults_per_architecture():
    c = _config()
    a, b = load_model(c, build_task(c)), load_model(c, build_task(c))
    assert a.fingerprint == b.fingerprint
    assert any("query" in k for k in trainable_state(a.model)) and any("value" in k for k in trainable_state(a.model))
    llama = cfg.load_config(None, ["model.name=tiny-llama", "task.type=causal-lm", "lora.target-modules=q_proj,k_proj,o_proj"])
    names = trainable_state(load_model(llama, build_task(llama)).model)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "o_proj"}


def test_a_different_seed_changes_the_fingerprint():
    tok = load_tokenizer("tiny-bert")
    one = load_base_model("tiny-bert", "SEQ_CLS", 5, tok, seed=0)
    two = load_base_model("tiny-bert", "SEQ_CLS", 5, tok, seed=1)
    assert base_fingerprint(one) != base_fingerprint(two)


def test_local_directory_loads_and_unknown_hub_id_says_what_to_do(tiny_bert_dir):
    c = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', "task.labels=a,b,c,d,e"])
    loaded = load_model(c, build_task(c))
    tok = load_tokenizer("tiny-bert")
    same = load_base_model("tiny-bert", "SEQ_CLS", 5, tok, seed=0)
    assert loaded.fingerprint == base_fingerprint(same)
    missing = cfg.load_config(None, ["model.name=nobody/no-such-model-xyz", "task.labels=a,b"])
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model(missing, build_task(missing))


def test_exported_adapter_loads_with_plain_peft_and_predicts_the_same(tiny_bert_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    c = cfg.load_config(None, [f'model.name="{tiny_bert_dir}"', "task.labels=a,b,c,d,e"])
    loaded = load_model(c, build_task(c))
    rng = np.random.default_rng(0)
    state = {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in trainable_state(loaded.model).items()}
    set_trainable_state(loaded.model, state)
    export_adapter(loaded.model, tmp_path / "adapter", str(tiny_bert_dir))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = loaded.tokenizer(["chest pain radiating to the arm", "swollen knee"], padding=True, return_tensors="pt")
    loaded.model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(**ids).logits, loaded.model(**ids).logits, atol=1e-5)
