"""Where the model computes and in what precision: device choice, autocast, loss scaling, gradient
checkpointing, a 4-bit base, and DP-SGD under bf16. The CPU runs all of it but CUDA itself; the
tests marked `gpu` run it on a GPU and skip without one."""

import json
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from fedlora import compute
from fedlora import config as cfg
from fedlora.client import runtime
from fedlora.data.labels import infer_labels
from fedlora.data.sites import simulated_site_data
from fedlora.models import (
    base_fingerprint,
    four_bit,
    load_base_model,
    load_model,
    load_tokenizer,
    redraw_on_cpu,
    trainable_state,
)
from fedlora.privacy.dpsgd import DPSGD, DPSettings
from fedlora.privacy.units import build_units
from fedlora.tasks import build_task
from fedlora.training import LocalTraining, evaluate_counts, plain_train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# bitsandbytes is the gpu extra, not a test dependency: it adds seconds to every process importing peft.
# Its CPU backend runs these where it is installed (pip install 'fedlora[gpu]').
needs_bitsandbytes = pytest.mark.skipif(find_spec("bitsandbytes") is None,
                                        reason="needs bitsandbytes (pip install 'fedlora[gpu]')")


def _site(*settings: str):
    config = infer_labels(cfg.load_config(None, ["model.name=tiny-bert", "model.max-length=32", *settings]))
    task = build_task(config)
    loaded = load_model(config, task)
    data = simulated_site_data(0, 4, config, task)
    return config, task, loaded, task.encode(data.train, loaded.tokenizer, config.model.max_length), data


def _linear_output_dtypes(model) -> tuple[set, list]:
    seen: set = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in model.modules() if type(m) is torch.nn.Linear]
    return seen, hooks


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_computes_the_forward_in_it_and_keeps_what_trains_in_float32(precision, dtype):
    config, task, loaded, examples, _ = _site(f"train.precision={precision}", "train.local-steps=3")
    before = trainable_state(loaded.model)
    seen, hooks = _linear_output_dtypes(loaded.model)
    result = plain_train(loaded.model, task, examples, config.train, loaded.tokenizer.pad_token_id, seed=0)
    for h in hooks:
        h.remove()
    after = trainable_state(loaded.model)
    assert seen == {dtype}  # every linear layer ran in the half precision
    assert {p.dtype for p in loaded.model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in loaded.model.parameters() if not p.requires_grad} == {dtype}  # the frozen base
    assert result.steps == 3 and np.isfinite(result.mean_loss)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflowed():
    config, task, loaded, examples, _ = _site("train.precision=fp16")
    loop = LocalTraining(loaded.model, task, examples, loaded.tokenizer.pad_token_id, steps=2, seed=0,
                         learning_rate=1e-2, precision="fp16").start()
    scaler = loop.method.scaler
    loop.step()
    assert scaler is not None and scaler.get_scale() > 1
    scaler.update(new_scale=1e38)  # the scaled loss overflows float16: the next step must not apply
    before = trainable_state(loaded.model)
    loop.step()
    assert all(np.array_equal(before[k], v) for k, v in trainable_state(loaded.model).items())
    assert scaler.get_scale() < 1e38  # and the scale came down
    loop.finish()


def test_fp16_is_refused_with_a_step_method_that_cannot_scale_the_loss():
    config, task, loaded, examples, data = _site()
    with pytest.raises(ValueError, match="fp16"):
        LocalTraining(loaded.model, task, examples, loaded.tokenizer.pad_token_id, steps=1, seed=0,
                      learning_rate=1e-2, precision="fp16",
                      steps_method=DPSGD(build_units(data.train, "", 1), 0.2, 1.0, DPSettings(1.0)))


def test_gradient_checkpointing_recomputes_each_layer_and_trains_exactly_the_same():
    counts, states = {}, {}
    for on in (False, True):
        config, task, loaded, examples, _ = _site(f"train.gradient-checkpointing={str(on).lower()}",
                                                  "train.local-steps=2")
        inside = loaded.model.get_base_model().bert.encoder.layer[0].attention  # a checkpointed layer's part
        calls = []
        hook = inside.register_forward_hook(lambda *_: calls.append(1))
        plain_train(loaded.model, task, examples, config.train, loaded.tokenizer.pad_token_id, seed=0)
        hook.remove()
        counts[on], states[on] = len(calls), trainable_state(loaded.model)
    assert counts == {False: 2, True: 4}  # one forward per step, plus one recomputation in each backward
    for name, value in states[False].items():
        np.testing.assert_allclose(states[True][name], value, rtol=1e-5, atol=1e-6)


@needs_bitsandbytes
def test_a_4bit_base_trains_float32_adapters_and_two_loads_agree(tiny_bert_dir):
    settings = [f"model.name={tiny_bert_dir}", "model.quantization=4bit", "task.labels=a,b,c,d,e",
                "train.local-steps=2"]
    config = cfg.load_config(None, settings)
    task = build_task(config)
    first, second = load_model(config, task), load_model(config, task)
    assert first.fingerprint == second.fingerprint
    base = first.model.get_base_model()
    query = base.bert.encoder.layer[0].attention.self.query.base_layer
    assert type(query).__name__ == "Linear4bit" and query.weight.dtype == torch.uint8
    assert type(base.classifier.original_module) is torch.nn.Linear  # the head trains: never quantized
    rows = [{"text": f"note {i} about {w}", "label": "abcde"[i % 5]} for i, w in enumerate(["chest", "skin"] * 8)]
    examples = task.encode(rows, first.tokenizer, 32)
    before = trainable_state(first.model)
    result = plain_train(first.model, task, examples, config.train, first.tokenizer.pad_token_id, seed=0)
    after = trainable_state(first.model)
    assert np.isfinite(result.mean_loss)
    assert {v.dtype for v in after.values()} == {np.dtype("float32")}
    assert any(not np.array_equal(before[k], after[k]) for k in before if "lora_B" in k)


def _headless(tiny_bert_dir, folder):
    AutoModel.from_pretrained(tiny_bert_dir).save_pretrained(folder)  # a checkpoint without a classifier
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    return folder


@needs_bitsandbytes
def test_a_head_the_checkpoint_lacks_is_drawn_again_from_the_cpus_generator(tiny_bert_dir, tmp_path):
    # transformers draws a missing head where the model loads, from that device's generator; a 4-bit
    # base loads on its GPU, so fedlora draws the head again on the CPU, as a CPU site would
    folder = _headless(tiny_bert_dir, tmp_path / "m")
    base = load_base_model(str(folder), "SEQ_CLS", 3, load_tokenizer(str(folder)), seed=3,
                           quantization=four_bit(torch.bfloat16))
    head = base.classifier
    with torch.no_grad():
        head.weight.fill_(7.0), head.bias.fill_(7.0)  # as if drawn elsewhere
    redraw_on_cpu(base, ["classifier.weight", "classifier.bias"], seed=3)
    drawn = torch.normal(0.0, base.config.initializer_range, tuple(head.weight.shape),
                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(head.weight.detach().cpu().float(), drawn)
    assert not head.bias.detach().any()


@needs_bitsandbytes
def test_a_4bit_fingerprint_covers_the_block_scales(tiny_bert_dir):
    config = cfg.load_config(None, [f"model.name={tiny_bert_dir}", "model.quantization=4bit", "task.labels=a,b,c,d,e"])
    task = build_task(config)
    base = load_model(config, task).model.get_base_model()
    before = base_fingerprint(base)
    state = base.bert.encoder.layer[0].attention.self.query.base_layer.weight.quant_state
    with torch.no_grad():  # the same codes, other scales: another base
        (state.state2.absmax if state.nested else state.absmax).mul_(2)
    assert base_fingerprint(base) != before


def test_dp_sgd_refuses_trainable_tensors_that_are_not_float32():
    config, task, loaded, examples, data = _site()
    loaded.model.get_base_model().classifier.modules_to_save["default"].to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 trainable tensors"):
        LocalTraining(loaded.model, task, examples, loaded.tokenizer.pad_token_id, steps=1, seed=0, learning_rate=1e-2,
                      steps_method=DPSGD(build_units(data.train, "", 1), 0.2, 1.0, DPSettings(1.0))).start()


def test_dp_sgd_under_bf16_clips_float32_per_sample_gradients():
    config, task, loaded, examples, data = _site("train.precision=bf16", "privacy.trainable=adapter")
    dp = DPSGD(build_units(data.train, "", 1), 0.25, 1.0, DPSettings(1.0))
    seen = []
    step = dp.step

    def checked_step():
        seen.append({p.grad_sample.dtype for p in dp.params if getattr(p, "grad_sample", None) is not None})
        step()

    dp.step = checked_step
    with LocalTraining(loaded.model, task, examples, loaded.tokenizer.pad_token_id, steps=3, seed=0,
                       learning_rate=1e-2, steps_method=dp, precision="bf16") as loop:
        for _ in range(3):
            loop.step()
    assert dp.noised_steps == 3
    assert all(dtypes == {torch.float32} for dtypes in seen if dtypes)
    assert any(seen)


def test_auto_picks_the_gpu_only_where_allowed_and_a_named_gpu_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compute.resolve_device("auto") == torch.device("cuda")
    assert compute.resolve_device("auto", gpu_allowed=False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute.resolve_device("auto") == torch.device("cpu")
    assert compute.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(compute.ComputeUnavailable, match="sees no CUDA GPU"):
        compute.resolve_device("cuda:1")


def test_a_simulated_site_takes_a_gpu_only_with_a_share_of_one(monkeypatch):
    asked = []
    monkeypatch.setattr(runtime, "load_model", lambda config, task, gpu_allowed: asked.append(gpu_allowed))
    for share, simulated in ((0.0, True), (0.25, True), (0.0, False)):
        config = cfg.load_config(None, ["model.name=tiny-bert", "task.labels=a,b", f"simulation.gpus-per-site={share}"])
        runtime._model(json.dumps(config.to_flat(), sort_keys=True), simulated, 8)
    assert asked == [False, True, True]


@pytest.mark.parametrize("settings, problem", [
    (["model.device=gpu0"], "model.device: 'gpu0' is not auto, cpu, cuda or cuda:N"),
    (["model.quantization=4bit"], "quantizes a checkpoint's weights as they load; 'tiny-bert' is built in-process"),
    (["model.name=/models/x", "model.quantization=4bit", "strategy.name=fedex"], "folds a correction into the frozen"),
    (["train.precision=bf16", "strategy.name=flora"], "train.precision = fp32 (not 'bf16')"),
    (["privacy.enabled=true", "train.precision=fp16"], "fp16 scales the loss"),
    (["privacy.enabled=true", "train.precision=bf16", "privacy.grad-sample-mode=ghost"], "use hooks, or fp32"),
    (["privacy.enabled=true", "privacy.trainable=adapter", "train.gradient-checkpointing=true"],
     "per-sample hooks would see each forward twice"),
])
def test_settings_that_cannot_compute_together_are_refused_before_anything_starts(settings, problem):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_config(None, ["model.name=tiny-bert", *settings])
    assert problem in str(err.value)


def test_dp_sgd_on_the_head_alone_takes_gradient_checkpointing_and_bf16():
    config = cfg.load_config(None, ["model.name=tiny-bert", "privacy.enabled=true", "train.precision=bf16",
                                    "train.gradient-checkpointing=true"])
    assert config.private_head_only and config.dp_compute_problems() == []


# -- on a GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_on_a_gpu_a_site_trains_and_evaluates_there_and_its_update_comes_back_to_the_cpu():
    config, task, loaded, examples, data = _site("model.device=cuda", "train.precision=bf16", "train.local-steps=3")
    assert loaded.device.type == "cuda" and compute.model_device(loaded.model).type == "cuda"
    cpu_config, _, cpu_loaded, _, _ = _site("model.device=cpu")
    assert loaded.fingerprint == cpu_loaded.fingerprint  # the same base, wherever it computes
    plain_train(loaded.model, task, examples, config.train, loaded.tokenizer.pad_token_id, seed=0)
    counts = evaluate_counts(loaded.model, task, task.encode(data.eval, loaded.tokenizer, 32),
                             loaded.tokenizer.pad_token_id, precision="bf16")
    assert counts["count"] == len(data.eval)
    assert all(isinstance(v, np.ndarray) for v in trainable_state(loaded.model).values())


@pytest.mark.gpu
@needs_cuda
def test_on_a_gpu_dp_sgd_draws_its_noise_there():
    config, task, loaded, examples, data = _site("model.device=cuda", "train.precision=bf16")
    dp = DPSGD(build_units(data.train, "", 1), 0.25, 1.0, DPSettings(1.0))
    with LocalTraining(loaded.model, task, examples, loaded.tokenizer.pad_token_id, steps=2, seed=0,
                       learning_rate=1e-2, steps_method=dp, precision="bf16") as loop:
        loop.step()
        loop.step()
    assert dp.noise_generator.device.type == "cuda" and dp.noised_steps == 2


@pytest.mark.gpu
@needs_cuda
@needs_bitsandbytes
def test_on_a_gpu_a_4bit_base_trains(tiny_bert_dir):
    settings = [f"model.name={tiny_bert_dir}", "model.quantization=4bit", "task.labels=a,b,c,d,e"]
    config = cfg.load_config(None, [*settings, "model.device=cuda", "train.precision=bf16"])
    task = build_task(config)
    loaded = load_model(config, task)
    assert loaded.device.type == "cuda"
    rows = [{"text": f"note {i}", "label": "abcde"[i % 5]} for i in range(16)]
    result = plain_train(loaded.model, task, task.encode(rows, loaded.tokenizer, 32), config.train,
                         loaded.tokenizer.pad_token_id, seed=0)
    assert np.isfinite(result.mean_loss)


@pytest.mark.gpu
@needs_cuda
@needs_bitsandbytes
def test_on_a_gpu_a_4bit_base_draws_the_same_missing_head_as_on_the_cpu(tiny_bert_dir, tmp_path):
    folder = _headless(tiny_bert_dir, tmp_path / "m")
    heads = []
    for device in ("cpu", "cuda"):
        config = cfg.load_config(None, [f"model.name={folder}", "model.quantization=4bit", "task.labels=a,b,c",
                                        f"model.device={device}"])
        head = load_model(config, build_task(config)).model.get_base_model().classifier.original_module
        heads.append(head.weight.detach().cpu().float())
    assert torch.equal(*heads)
