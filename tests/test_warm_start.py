"""A run started from a previous run's adapter (`model.warm-start`): the sites get that adapter as the
round-1 global model, the run records which adapter it descends from, and an adapter that does not fit
the run is refused with what differs."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora import config as cfg
from fedlora.simulations.inprocess import run_inprocess


def _settings(tiny_bert_dir, rounds: int) -> list[str]:
    return [f'model.name="{tiny_bert_dir}"', "model.max-length=32", "federation.num-sites=2",
            f"federation.rounds={rounds}", "data.records-per-site=40", "train.local-steps=3",
            "train.learning-rate=0.01"]


@pytest.fixture(scope="module")
def first(tiny_bert_dir, tmp_path_factory):
    return run_inprocess(cfg.load_config(None, _settings(tiny_bert_dir, 3)), tmp_path_factory.mktemp("first"))


def _rounds(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_warm_started_run_begins_from_the_previous_adapter_and_goes_on_from_there(first, tiny_bert_dir, tmp_path):
    second = run_inprocess(cfg.load_config(None, [*_settings(tiny_bert_dir, 1), f'model.warm-start="{first}"']),
                           tmp_path / "second")
    summary = json.loads((second / "summary.json").read_text())
    assert summary["warm_start"]["adapter"] == str(first / "adapter")
    assert len(summary["warm_start"]["sha256"]) == 64
    cold = _rounds(first)
    warm = _rounds(second)
    # scored before round 1, it is where the first run ended
    assert summary["warm_start"]["test_accuracy"] == cold[-1]["test_accuracy"]
    assert summary["warm_start"]["test_loss"] == pytest.approx(cold[-1]["test_loss"], rel=1e-5)
    # its first round goes on from where the first run ended (the sites' training loss; a random tiny model
    # does not generalize to the test set): below the first run's last round, not back at its first
    assert [r["train_loss"] for r in cold] == sorted((r["train_loss"] for r in cold), reverse=True)
    assert warm[0]["train_loss"] < cold[-1]["train_loss"] < cold[0]["train_loss"]
    # the adapter it exported moved on from the one it started from
    before, after = load_file(str(first / "adapter" / "adapter_model.safetensors")), \
        load_file(str(second / "adapter" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not np.allclose(before[k], after[k]) for k in before)


def test_the_round_one_global_model_is_the_previous_adapter_exactly(first, tiny_bert_dir, tmp_path):
    from fedlora.data.labels import infer_labels
    from fedlora.models import load_model
    from fedlora.server.warm_start import load_warm_start
    from fedlora.tasks import build_task

    config = infer_labels(cfg.load_config(None, [*_settings(tiny_bert_dir, 1), f'model.warm-start="{first}"']))
    loaded = load_model(config, build_task(config))
    warm = load_warm_start(first, config, loaded.model)
    saved = load_file(str(first / "adapter" / "adapter_model.safetensors"))
    assert len(warm.state) == len(saved)
    for name, value in warm.state.items():  # PEFT names the saved tensors without the adapter's name
        key = name.replace(".default.", ".").replace(".modules_to_save.", ".")
        np.testing.assert_array_equal(value, saved[key])


@pytest.mark.parametrize("change, says", [
    (["lora.rank=4"], "LoRA rank 8, this run's is 4"),
    (["task.labels=neurology,cardiology,orthopedics,gastroenterology,pulmonology"],
     "labels ['cardiology', 'neurology'"),  # the same names in another order: the head's rows would swap
    (['lora.target-modules=["query"]'], "target modules"),
    (["lora.alpha=32"], "LoRA alpha 16.0 (rsLoRA False), this run's is 32.0"),
    (["strategy.name=fedsa"], "keeps B at each site"),
])
def test_an_adapter_that_does_not_fit_is_refused_with_what_differs(first, tiny_bert_dir, tmp_path, change, says):
    config = cfg.load_config(None, [*_settings(tiny_bert_dir, 1), f'model.warm-start="{first}"', *change])
    with pytest.raises(Exception, match="does not fit this run") as err:
        run_inprocess(config, tmp_path / "refused")
    assert says in str(err.value)
    assert "does not fit this run" in json.loads((tmp_path / "refused" / "failed.json").read_text())["error"]


def test_a_missing_adapter_is_named(tiny_bert_dir, tmp_path):
    config = cfg.load_config(None, [*_settings(tiny_bert_dir, 1), f'model.warm-start="{tmp_path / "nothing"}"'])
    with pytest.raises(Exception, match="no adapter at"):
        run_inprocess(config, tmp_path / "run")


def test_a_resumed_warm_started_run_keeps_its_lineage(first, tiny_bert_dir, tmp_path):
    settings = [*_settings(tiny_bert_dir, 1), f'model.warm-start="{first}"']
    run = run_inprocess(cfg.load_config(None, settings), tmp_path / "run")
    lineage = json.loads((run / "summary.json").read_text())["warm_start"]
    resumed = run_inprocess(cfg.load_config(None, [*settings, "federation.rounds=2", "output.resume=true"]),
                            tmp_path / "run")
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["warm_start"] == lineage
