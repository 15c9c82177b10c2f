"""The ClientApp's train handler under DP, called in-process (no Ray): the site's
own budget makes DP mandatory and wins, the spend is on disk when the reply is
built, only the epsilon summary leaves, and a refusal is an error reply the
server recognizes."""

import json

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from fedlora import config as cfg
from fedlora import wire
from fedlora.arrays import from_record, to_record
from fedlora.client.app import app
from fedlora.client.runtime import site_runtime
from fedlora.data import synthetic
from fedlora.models import trainable_state
from fedlora.privacy.accounting import epsilon_by_round
from fedlora.privacy.ledger import Ledger
from fedlora.privacy.server import is_budget_refusal
from fedlora.training import planned_steps


def _message(state, server_round: int, fingerprint: str) -> Message:
    content = RecordDict({wire.ARRAYS: to_record(state),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round,
                                                     wire.BASE_FINGERPRINT: fingerprint})})
    metadata = Metadata(run_id=7, message_id=f"m{server_round}", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=3600,
                        message_type=MessageType.TRAIN)
    return Message(content, metadata=metadata)


def test_site_budget_is_enforced_by_the_train_handler(tmp_path):
    config = cfg.load_config(None, [
        "model.name=tiny-bert", "model.max-length=32", "data.records-per-site=40", "federation.rounds=5",
        "task.labels=" + ",".join(synthetic.LABELS), f"output.dir={tmp_path}",
        "privacy.enabled=false", "privacy.epsilon=8", "privacy.noise-multiplier=1.5", "privacy.accountant=rdp",
        "privacy.trainable=adapter"])
    node = {"partition-id": 0, "num-partitions": 2, "privacy-epsilon": 3.0}  # the hospital's own, stricter
    context = Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config=config.to_flat())
    rt = site_runtime(context)
    state = trainable_state(rt.loaded.model)
    units = len(rt.train_examples)
    steps = planned_steps(units, config.privacy.batch_size, config.privacy.local_epochs, 0)
    by_round = epsilon_by_round(1.5, min(1.0, config.privacy.batch_size / units), steps, 5, 1e-5, "rdp")
    refused_at = next(r for r, e in enumerate(by_round, start=1) if e > 3.0)
    assert by_round[refused_at - 1] <= 8.0  # the run's budget alone would have let it train

    ledger = Ledger(tmp_path / "sites" / rt.data.name)
    for r in range(1, refused_at):
        reply = app(_message(state, r, rt.loaded.fingerprint), context)
        assert not reply.has_error()
        metrics = reply.content[wire.METRICS]
        assert wire.TRAIN_LOSS not in metrics  # data-dependent and not noised: stays at the site
        assert metrics[wire.DP_EPSILON] == pytest.approx(by_round[r - 1])
        assert metrics[wire.DP_BUDGET_EPSILON] == 3.0
        privacy = reply.content.config_records[wire.PRIVACY]
        assert privacy[wire.DP_LEDGER_HEAD] == ledger.head()  # spend was on disk before the reply
        assert privacy[wire.DP_UNIT] == "record"
        delta = from_record(reply.content[wire.ARRAYS])
        assert all(abs(v).max() > 0 for v in delta.values())
    refusal = app(_message(state, refused_at, rt.loaded.fingerprint), context)
    assert refusal.has_error() and is_budget_refusal(refusal)
    assert "refuses round" in refusal.error.reason
    entries = ledger.entries()
    assert [e["event"] for e in entries][-1] == "refused"
    trained = [e for e in entries if e["event"] == "train"]
    assert trained[0]["budget_source"].startswith("epsilon: node config")
    assert json.dumps(trained[0]["versions"]).count("opacus") == 1


def test_under_secure_aggregation_a_refusal_names_no_figures(tmp_path):
    """Its steps, sigma and sampling rate would give the site's record count away, which masking hides."""
    from fedlora.client.app import train

    config = cfg.load_config(None, [
        "model.name=tiny-bert", "model.max-length=32", "data.records-per-site=40", "federation.rounds=5",
        "task.labels=" + ",".join(synthetic.LABELS), f"output.dir={tmp_path}", "secagg.enabled=true",
        "federation.min-sites=3", "privacy.enabled=true", "privacy.noise-multiplier=0.5"])
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config=config.to_flat())
    rt = site_runtime(context)
    reply = train(rt, _message(trainable_state(rt.loaded.model), 1, rt.loaded.fingerprint), context)
    assert is_budget_refusal(reply)
    assert reply.error.reason == f"site {rt.data.name} refuses round 1: its privacy budget would be exceeded"
    refusal = [e for e in Ledger(tmp_path / "sites" / rt.data.name).entries() if e["event"] == "refused"][-1]
    assert "q " in refusal["reason"] and "sigma 0.5" in refusal["reason"]  # the detail stays in the site's ledger


@pytest.mark.parametrize("trainable, factors_train, rate", [("auto", False, 0.1), ("head", False, 0.1),
                                                            ("adapter", True, 5e-3)])
def test_dp_sgd_trains_the_head_alone_unless_the_adapter_is_asked_for(tmp_path, trainable, factors_train, rate):
    """The private recipe: on a classification task DP-SGD noises and trains the head only (at the
    head's learning rate, on the frozen model's features without dropout); the LoRA factors come
    back unchanged, and train again after the round."""
    from fedlora.strategies.factors import factor_of

    config = cfg.load_config(None, [
        "model.name=tiny-bert", "model.max-length=32", "data.records-per-site=40", "federation.rounds=2",
        "task.labels=" + ",".join(synthetic.LABELS), f"output.dir={tmp_path}", "privacy.enabled=true",
        "privacy.noise-multiplier=0.5", "privacy.batch-size=8", "privacy.epsilon=50",
        f"privacy.trainable={trainable}"])
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=config.to_flat())
    rt = site_runtime(context)
    dropouts = [m for m in rt.loaded.model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = {m.p for m in dropouts}
    seen = set()  # the dropout rates the training forward passes ran with
    hooks = [m.register_forward_pre_hook(lambda m, _: seen.add(m.p) if m.training else None) for m in dropouts]
    reply = app(_message(trainable_state(rt.loaded.model), 1, rt.loaded.fingerprint), context)
    for hook in hooks:
        hook.remove()
    assert not reply.has_error()
    # frozen features are fed to the head as they are: no dropout while the head trains alone
    assert seen == (rates if factors_train else {0.0}) and 0.0 not in rates
    assert {m.p for m in dropouts} == rates
    delta = from_record(reply.content[wire.ARRAYS])
    factors = {k: v for k, v in delta.items() if factor_of(k)}
    head = {k: v for k, v in delta.items() if not factor_of(k)}
    assert factors and head
    assert all(abs(v).max() > 0 for v in head.values())
    assert any(abs(v).max() > 0 for v in factors.values()) == factors_train
    assert all(p.requires_grad for n, p in rt.loaded.model.named_parameters() if factor_of(n))
    trained = [e for e in Ledger(tmp_path / "sites" / rt.data.name).entries() if e["event"] == "train"]
    assert trained[-1]["learning_rate"] == rate


def test_only_a_task_with_a_head_can_train_the_head_alone():
    causal = ["task.type=causal-lm", "model.name=tiny-llama"]
    assert not cfg.load_config(None, causal).private_head_only  # auto: a causal LM trains its adapter
    with pytest.raises(ValueError, match="privacy.trainable = head needs a task with a head"):
        cfg.load_config(None, [*causal, "privacy.trainable=head"])


@pytest.mark.parametrize("outer", [["privacy.client-dp=true"], ["secagg.enabled=true", "secagg.dp-noise-multiplier=1",
                                                                 "federation.min-sites=3"]])
def test_the_head_alone_is_refused_where_outer_noise_would_reach_the_untrained_factors(outer):
    with pytest.raises(ValueError, match="would take noise each round"):
        cfg.load_config(None, ["privacy.enabled=true", *outer])
    assert cfg.load_config(None, ["privacy.enabled=true", "privacy.trainable=adapter", *outer]).privacy.enabled
