"""The site side of the strategies, in-process: the ClientApp handlers are called directly
with constructed Flower messages (no Ray, no SuperLink), on a tiny BERT."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from fedlora import config as cfg
from fedlora import wire
from fedlora.arrays import from_record, to_record
from fedlora.client import app as client_app
from fedlora.client.personal import RECORD
from fedlora.client.runtime import site_runtime
from fedlora.data import synthetic
from fedlora.frozen_base import set_base_correction
from fedlora.models import export_adapter, load_base_model, load_model, set_trainable_state, trainable_state
from fedlora.simulations import misbehaving
from fedlora.simulations.attacks import flip_labels, scale_update
from fedlora.strategies import SiteUpdate, build_strategy
from fedlora.strategies.correction import BaseCorrection
from fedlora.strategies.factors import is_factor, lora_layers
from fedlora.server.export_correction import fold_into_exported_adapter
from fedlora.tasks import build_task

_ids = itertools.count()


def _config(*sets: str) -> cfg.RunConfig:
    return cfg.load_config(None, ["model.name=tiny-bert", f"task.labels={','.join(synthetic.LABELS)}",
                                  "data.records-per-site=20", "federation.num-sites=2", "train.local-steps=2",
                                  "model.max-length=32", "federation.min-sites=2", *sets])


@pytest.fixture(scope="module")
def server():
    """The coordinator's side: the run configuration and its own copy of the model."""
    config = _config()
    task = build_task(config)
    return config, load_model(config, task)


def _strategy(config, name: str, *sets: str):
    return build_strategy(cfg.from_nested(config.to_nested(), dict(s.split("=", 1) for s in
                                                                   [f"strategy.name={name}", *sets])))


def _message(strategy, global_state, kind: str, node: int = 1) -> Message:
    down = strategy.downlink(global_state)
    config = ConfigRecord({wire.SERVER_ROUND: 1, **strategy.client_config(1)})
    content = RecordDict({**{name: to_record(arrays) for name, arrays in down.items()}, wire.CONFIG: config})
    return Message(content, metadata=Metadata(run_id=1, message_id=f"m{next(_ids)}", src_node_id=0,
                                              dst_node_id=node, reply_to_message_id="", group_id="",
                                              created_at=time.time(), ttl=3600, message_type=kind))


def _context(config, partition: int, **node) -> Context:
    return Context(run_id=1, node_id=partition + 1, state=RecordDict(), run_config=config.to_flat(),
                   node_config={"partition-id": partition, "num-partitions": 2, **node})


def _site_params(context) -> dict[str, np.ndarray]:
    return trainable_state(site_runtime(context).loaded.model)


def test_ffa_site_freezes_a_and_sends_only_b(server):
    config, loaded = server
    g = trainable_state(loaded.model)
    ctx = _context(config, 0)
    reply = client_app.app(_message(_strategy(config, "ffa"), g, "train"), ctx)
    delta = from_record(reply.content[wire.ARRAYS])
    assert not any(is_factor(k, "A") for k in delta)
    assert any(is_factor(k, "B") and np.abs(v).max() > 0 for k, v in delta.items())
    after = _site_params(ctx)
    assert all(np.array_equal(after[k], g[k]) for k in g if is_factor(k, "A"))  # A did not move
    model = site_runtime(ctx).loaded.model
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)  # restored


def test_fedsa_site_keeps_its_b_in_context_and_on_disk(server, tmp_path):
    config, loaded = server
    g = trainable_state(loaded.model)
    fedsa = _strategy(config, "fedsa")
    ctx0 = _context(config, 0, **{"state-dir": str(tmp_path)})
    reply = client_app.app(_message(fedsa, g, "train"), ctx0)
    assert not any(is_factor(k, "B") for k in from_record(reply.content[wire.ARRAYS]))
    kept = from_record(ctx0.state[RECORD])
    assert kept and all(is_factor(k, "B") for k in kept) and max(np.abs(v).max() for v in kept.values()) > 0
    assert list(tmp_path.glob("personal-adapter-*.safetensors"))

    # evaluation at site 0 uses its own B ...
    client_app.app(_message(fedsa, g, "evaluate"), ctx0)
    assert all(np.array_equal(_site_params(ctx0)[k], v) for k, v in kept.items())
    # ... while site 1, served by the same process and model, uses its own (still initial) B
    ctx1 = _context(config, 1)
    client_app.app(_message(fedsa, g, "evaluate", node=2), ctx1)
    assert all(not _site_params(ctx1)[k].any() for k in kept)
    # a restarted site 0 (empty context state) gets its B back from its disk
    restarted = _context(config, 0, **{"state-dir": str(tmp_path)})
    client_app.app(_message(fedsa, g, "evaluate"), restarted)
    assert all(np.array_equal(_site_params(restarted)[k], v) for k, v in kept.items())


def _random_correction(state, seed: int) -> BaseCorrection:
    rng = np.random.default_rng(seed)
    c = BaseCorrection()
    for layer, (a, b) in lora_layers(state).items():
        c.add(layer, rng.normal(size=(state[b].shape[0], 3)) * 0.1, rng.normal(size=(3, state[a].shape[1])))
    return c


@pytest.mark.parametrize("name", ["flora", "fedex"])
def test_base_correction_is_set_per_message_and_never_lingers(server, name):
    config, loaded = server
    g = trainable_state(loaded.model)
    layer = next(iter(lora_layers(g)))
    w0 = loaded.model.get_submodule(layer).get_base_layer().weight.detach().clone()  # the pristine base
    c1, c2 = _random_correction(g, 1), _random_correction(g, 2)
    folding = _strategy(config, name)
    ctx0, ctx1 = _context(config, 0), _context(config, 1)
    site_weight = site_runtime(ctx0).loaded.model.get_submodule(layer).get_base_layer().weight

    folding.correction = c1
    client_app.app(_message(folding, g, "train"), ctx0)
    assert torch.allclose(site_weight, w0 + torch.from_numpy(c1.dense(layer)), atol=1e-6)
    folding.correction = c2  # another round, another site, same process: C2 replaces C1
    client_app.app(_message(folding, g, "evaluate", node=2), ctx1)
    assert torch.allclose(site_weight, w0 + torch.from_numpy(c2.dense(layer)), atol=1e-6)
    client_app.app(_message(_strategy(config, "fedit"), g, "evaluate"), ctx0)  # no correction
    assert torch.equal(site_weight, w0)


def test_a_smaller_rank_site_trains_and_sends_at_its_rank(server):
    config, loaded = server
    g = trainable_state(loaded.model)
    ctx = _context(config, 1, **{"lora-rank": 4})
    reply = client_app.app(_message(_strategy(config, "fedit"), g, "train", node=2), ctx)
    delta, metrics = from_record(reply.content[wire.ARRAYS]), dict(reply.content[wire.METRICS])
    a, b = next(iter(lora_layers(g).values()))
    assert delta[a].shape == (4, g[a].shape[1]) and delta[b].shape == (g[b].shape[0], 4)
    assert metrics[wire.LORA_RANK] == 4
    update = SiteUpdate("site-1", 1.0, delta, metrics)
    assert _strategy(config, "flora").check_upload(update, g) is None
    assert "heterogeneous" in _strategy(config, "median").check_upload(update, g)


def test_fedprox_term_holds_the_site_near_the_global_adapter(server):
    config, loaded = server
    g = trainable_state(loaded.model)

    def norm(mu: float) -> float:
        reply = client_app.app(_message(_strategy(config, "fedprox", f"strategy.fedprox.mu={mu}"), g, "train"),
                                 _context(config, 0))
        return float(np.sqrt(sum(np.sum(v ** 2) for v in from_record(reply.content[wire.ARRAYS]).values())))

    assert norm(1e4) < 0.9 * norm(0.0)


def test_exported_adapter_carries_the_folded_correction(server, tmp_path):
    config, loaded = server
    model = loaded.model.eval()  # no dropout
    rng = np.random.default_rng(7)
    state = {k: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in trainable_state(model).items()}
    correction = _random_correction(state, 3)
    set_trainable_state(model, state)
    set_base_correction(model, correction)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    try:
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        export_adapter(model, tmp_path, "tiny-bert")
        rank = fold_into_exported_adapter(tmp_path, correction, config.lora.alpha / config.lora.rank)
    finally:
        set_base_correction(model, None)
    assert rank == config.lora.rank + 3
    from peft import PeftModel

    tok = loaded.tokenizer
    base = load_base_model("tiny-bert", "SEQ_CLS", len(synthetic.LABELS), tok, seed=config.model.seed)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)


def test_attacks_flip_labels_and_scale_updates():
    assert [e["label"] for e in flip_labels([{"label": 0}, {"label": 4}], 5)] == [1, 0]
    assert np.array_equal(scale_update({"x": np.ones(2, np.float32)}, 10.0)["x"], [10.0, 10.0])


def test_an_attack_runs_in_the_simulations_client_app_only(server):
    """The production ClientApp never attacks; the simulation's test app does, at the listed site."""
    config = _config("simulation.attack=scale-update", "simulation.attack-sites=[0]", "simulation.attack-scale=10")
    g = trainable_state(server[1].model)

    def update(app, partition: int) -> dict[str, np.ndarray]:
        reply = app(_message(_strategy(config, "fedit"), g, "train"), _context(config, partition))
        return from_record(reply.content[wire.ARRAYS])

    honest, attacked = update(client_app.app, 0), update(misbehaving.app, 0)
    for k in honest:  # same seed, same start: the attacker sends 10x the honest update
        np.testing.assert_allclose(attacked[k], 10 * honest[k], rtol=1e-5, atol=1e-7)
    bystander, same = update(client_app.app, 1), update(misbehaving.app, 1)
    assert all(np.array_equal(bystander[k], same[k]) for k in bystander)
