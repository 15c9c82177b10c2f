"""The pure parts of the `fedlora bench` suites lora-vs-full and overheads: the full fine-tuning
path, the stepwise trainer, byte counts, ratios, fits and the rendered sections. Tiny models only."""

import numpy as np
import pytest
import torch

from fedlora import config as cfg
from fedlora.bench import lora_vs_full as lvf
from fedlora.bench import overheads as ovh
from fedlora.data.sites import simulated_site_data
from fedlora.models import count_parameters, trainable_state
from fedlora.data.labels import infer_labels
from fedlora.tasks import build_task
from fedlora.training import plain_train

TINY = ["model.name=tiny-bert", "model.max-length=32", "data.records-per-site=30", "train.batch-size=4",
        "train.local-epochs=1"]


@pytest.fixture(scope="module")
def tiny():
    config = infer_labels(cfg.load_config(None, TINY))
    return config, build_task(config)


def test_full_fine_tuning_trains_every_parameter_and_lora_only_the_adapter_and_head(tiny):
    config, task = tiny
    full, _ = lvf.full_model(config, task)
    trainable, total = count_parameters(full)
    assert trainable == total > 100_000
    assert type(full).__name__ == "BertForSequenceClassification"  # no LoRA wrapper

    lora, _ = lvf.lora_model(config, task)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "modules_to_save" in n for n in names)
    assert any("lora_" in n for n in names) and any("classifier" in n for n in names)
    lora_trainable, _ = count_parameters(lora)
    assert lora_trainable < 0.05 * total


def test_full_fine_tuning_changes_every_weight_tensor_in_one_step(tiny):
    config, task = tiny
    model, tok = lvf.full_model(config, task)
    examples = task.encode(simulated_site_data(0, 4, config, task).train, tok, 32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lvf.Trainer(model, task, examples, config.train, tok.pad_token_id, seed=0, steps=1).step()
    # the word embeddings move only in the rows of the batch's tokens; every other tensor moves
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_trainer_steps_are_local_train_steps(tiny):
    """The stepwise trainer reproduces fedlora.training.local_train exactly (same batches, seeds, AdamW)."""
    config, task = tiny
    train_cfg = cfg.TrainSection(**{**config.train.__dict__, "local_steps": 3})
    states = []
    for stepwise in (False, True):
        model, tok = lvf.lora_model(config, task)
        examples = task.encode(simulated_site_data(0, 4, config, task).train, tok, 32)
        if stepwise:
            trainer = lvf.Trainer(model, task, examples, train_cfg, tok.pad_token_id, seed=7, steps=3)
            seconds = [trainer.step() for _ in range(3)]
            assert all(wall > 0 and cpu >= 0 for wall, cpu in seconds)
            with pytest.raises(StopIteration):
                trainer.step()
        else:
            plain_train(model, task, examples, train_cfg, tok.pad_token_id, seed=7)
        states.append(trainable_state(model))
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        np.testing.assert_allclose(states[0][name], states[1][name], rtol=1e-6, atol=1e-7)


def test_update_bytes_are_four_bytes_per_parameter_plus_little(tiny):
    config, task = tiny
    for model, _ in (lvf.lora_model(config, task), lvf.full_model(config, task)):
        full = type(model).__name__ == "BertForSequenceClassification"
        state = lvf.update_state(model, full)
        params = sum(v.size for v in state.values())
        nbytes = lvf.update_bytes(state)
        # per tensor: its name, and the .npy header (dtype, shape) of Flower's Array
        assert 4 * params <= nbytes <= 4 * params + sum(200 + len(name) for name in state)
        if full:
            assert params >= count_parameters(model)[1]  # every weight travels (and any buffers)
        else:
            assert params == count_parameters(model)[0]


def test_exported_adapter_is_its_float32_parameters_on_disk(tiny, tmp_path):
    from fedlora.models import export_adapter

    config, task = tiny
    model, _ = lvf.lora_model(config, task)
    export_adapter(model, tmp_path / "adapter", "tiny-bert")
    trainable, _ = count_parameters(model)
    weights = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert 4 * trainable <= weights <= 4 * trainable + 20_000  # safetensors header
    assert lvf.folder_bytes(tmp_path / "adapter") > weights  # + adapter_config.json, README


def test_ratio_and_claim_helpers():
    assert lvf.ratio(3.0, 1.5) == 2.0
    assert lvf.ratio(None, 1.0) is None and lvf.ratio(1.0, 0) is None and lvf.ratio(1.0, None) is None
    assert lvf.against(0.5, 0.7, 0.85) == "below"
    assert lvf.against(0.7, 0.7, 0.85) == "within"
    assert lvf.against(0.9, 0.7, 0.85) == "above"


def test_federation_steps_are_the_centralized_baselines(tiny):
    config, task = tiny  # 4 sites x 24 training rows, batch 4, 1 epoch, 5 rounds
    assert lvf.federation_steps(config, task) == 5 * 4 * 6


def _lvf_figures(quick_steps=320):
    variant = {"trainable": 0, "total": 0, "lora_factors": 0, "train_rows": 1024, "test_rows": 500,
               "median_step_seconds": 0.0, "median_step_cpu_seconds": 0.0, "train_seconds": 0.0,
               "peak_rss_bytes": 0, "memory_increase_bytes": 0, "update_bytes": 0, "disk_bytes": 0,
               "test_accuracy": 0.0, "test_macro_f1": 0.0, "trainable_share": 0.0}
    lora = {**variant, "trainable": 75_653, "lora_factors": 73_728, "median_step_seconds": 0.4,
            "median_step_cpu_seconds": 0.8, "train_seconds": 128.0, "peak_rss_bytes": 900 << 20,
            "memory_increase_bytes": 300 << 20, "update_bytes": 308_000, "disk_bytes": 312_000,
            "test_accuracy": 0.93, "test_macro_f1": 0.92, "trainable_share": 75_653 / 22_715_141}
    full = {**variant, "trainable": 22_715_141, "total": 22_715_141, "median_step_seconds": 0.6,
            "median_step_cpu_seconds": 1.2, "train_seconds": 192.0, "peak_rss_bytes": 1200 << 20,
            "memory_increase_bytes": 700 << 20, "update_bytes": 90_900_000, "disk_bytes": 90_900_000,
            "test_accuracy": 0.95, "test_macro_f1": 0.95, "trainable_share": 1.0}
    fig = {"model": "minilm", "sites": 4, "steps": quick_steps, "batch_size": 16, "max_length": 64,
           "lora": {"rank": 8, "alpha": 16.0, "target_modules": "query,value", "learning_rate": lvf.LORA_LR},
           "base_parameters": 22_715_141, "variants": {"lora": lora, "full": full}}
    r = {"step_time_full_over_lora": 1.5, "step_cpu_full_over_lora": 1.5, "compute_saving": 1 / 3,
         "wall_saving": 1 / 3, "peak_rss_full_over_lora": 4 / 3, "memory_increase_full_over_lora": 7 / 3,
         "update_bytes_full_over_lora": 295.0, "accuracy_lora_over_full": 0.93 / 0.95,
         "macro_f1_lora_over_full": 0.92 / 0.95}
    fig["ratios"] = r
    return fig


def test_lora_vs_full_section_states_each_claim_once():
    text = lvf.render(_lvf_figures(), quick=False)
    assert "| trainable parameters | 75,653 | 22,715,141 |" in text
    assert "33% less CPU time" in text and "below the claim" in text  # 70-85% claimed
    assert "0.33% here (within the claim)" in text
    assert "0.31 MB on disk" in text and "below 'a few MB'" in text
    assert "98% of full fine-tuning's test accuracy" in text and "above the claimed range" in text
    assert "CPU resident set size" in text
    quick = lvf.render(_lvf_figures(16), quick=True)
    assert "does not test the claim" in quick and "above the claimed range" not in quick


def test_both_variants_train_in_their_own_processes_taking_turns(tmp_path):
    """The whole lora-vs-full measurement, tiny: two spawned processes, 3 steps each in turns of 2."""
    plan = lvf.Plan(model="tiny-bert", steps=3, chunk=2, sets=["model.max-length=32", "data.records-per-site=20"])
    fig = lvf.measure(plan, tmp_path)
    lora, full = fig["variants"]["lora"], fig["variants"]["full"]
    assert lora["steps"] == full["steps"] == 3
    assert full["trainable"] == full["total"] == fig["base_parameters"] > 100 * lora["trainable"]
    assert lora["lora_factors"] < lora["trainable"]  # + the head
    assert fig["ratios"]["update_bytes_full_over_lora"] > 10
    assert lora["peak_rss_bytes"] >= lora["rss_after_load_bytes"] > 0
    assert (tmp_path / "lora-export" / "adapter_config.json").exists()
    assert 0 <= lora["test_accuracy"] <= 1 and lora["test_rows"] == 500
    assert "| test accuracy |" in lvf.render(fig, quick=True)


def test_marginal_seconds_fit_and_fedavg():
    fixed, per_site = ovh.marginal_seconds([2, 4, 8, 16], [1.0 + 0.5 * n for n in (2, 4, 8, 16)])
    assert fixed == pytest.approx(1.0) and per_site == pytest.approx(0.5)
    g = {"w": np.zeros(2, dtype=np.float32)}
    new = ovh.fedavg(g, [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 3.0])}], [1.0, 3.0])
    np.testing.assert_allclose(new["w"], [0.25, 2.25])
    assert ovh.steady([{"round_seconds": 9.0}, {"round_seconds": 2.0}]) == 2.0


def test_plain_round_trains_every_site_and_times_its_parts():
    config = ovh.with_rounds(TINY, "federation.num-sites=2", "train.local-steps=2")
    plain = ovh.PlainRound(config)
    before = {k: v.copy() for k, v in plain.global_state.items()}
    seconds = plain()
    assert seconds["train"] > 0 and seconds["evaluate"] > 0
    assert seconds["total"] == pytest.approx(seconds["train"] + seconds["evaluate"])
    assert len(plain.train) == 2 and plain.test  # the central test set is evaluated too
    assert all(np.array_equal(before[k], plain.global_state[k]) for k in before)  # rounds start alike


def test_overheads_section_renders_every_part():
    fig = {
        "framework": {"model": "tiny-bert", "sites": 4, "train_rows_per_site": [256] * 4, "steps_per_site": [16] * 4,
                      "test_rows": 500, "repeats": 3, "inprocess_round_seconds": 2.0,
                      "inprocess_first_round_seconds": 3.0, "inprocess_run_wall_seconds": 6.0,
                      "plain_round_seconds": 1.6, "plain_train_seconds": 1.3, "plain_evaluate_seconds": 0.3,
                      "inprocess_over_plain": 1.25, "inprocess_overhead_seconds": 0.4,
                      "ray_round_seconds": 2.5, "ray_first_round_seconds": 9.0, "ray_run_wall_seconds": 60.0,
                      "ray_plain_round_seconds": 1.6, "ray_over_plain": 1.56, "ray_cpus_per_site": 1},
        "security": {"model": "tiny-bert", "adapter_parameters": 4421, "steps_per_site": 4, "repeats": 3,
                     "round_seconds": {"plain": 1.0, "secagg": 1.2, "dp": 1.5},
                     "round_ratio": {"plain": 1.0, "secagg": 1.2, "dp": 1.5},
                     "train_seconds": {"plain": 0.2, "secagg": 0.2, "dp": 0.3},
                     "train_ratio": {"plain": 1.0, "secagg": 1.0, "dp": 1.5},
                     "protocol": {"plain_cpu_seconds": 0.002, "secure_cpu_seconds": 0.008, "ratio": 4.0,
                                  "secure_upload_bytes_per_param": 4.1, "repeats": 3},
                     "dp_step": {"batch": 16, "repeats": 5, "seconds": {"plain": 0.02, "dp-hooks": 0.03},
                                 "ratio": {"plain": 1.0, "dp-hooks": 1.5}}},
        "sites": {"settings": ["model.name=tiny-bert"], "repeats": 1, "fit_fixed_seconds": 0.1,
                  "fit_per_site_seconds": 0.05,
                  "rows": [{"sites": n, "round_seconds": 0.1 + 0.05 * n, "per_site_seconds": 0.05,
                            "slowest_site_train_seconds": 0.03, "bytes_up": 100 * n, "bytes_down": 200 * n}
                           for n in (2, 4)]},
    }
    text = ovh.render(fig, quick=False)
    for expected in ("| in-process (sites in turn) | 2.000 | 1.600 | 1.250 |", "Ray Simulation Engine",
                     "Ray's start and the actors' model loading are excluded", "| secagg | 1.200 | 1.200 |",
                     "dp-hooks 0.030 s (× 1.50)", "| 4 | 0.300 | 0.050 |", "0.10 s + 0.050 s × sites",
                     "`secure_aggregation.fedlora_round`", "`privacy.step_cost`"):  # the suites that measure them
        assert expected in text, expected
    del fig["framework"]["ray_round_seconds"]
    assert "skips the Ray Simulation Engine" in ovh.render(fig, quick=True)
