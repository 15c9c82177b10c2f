"""DP-SGD on a tiny PEFT model: per-sample gradients, clipping, noise, empty
batches, the did-it-train guard, and hooks that never stack on the cached model.

DP-SGD is the step method of the one training loop (fedlora.training.local_train);
the first tests drive its steps by hand on an SGD optimizer to check the arithmetic."""

import pytest
import torch

from fedlora import config as cfg
from fedlora.data import synthetic
from fedlora.models import load_model
from fedlora.privacy.dpsgd import DPSGD, DPSettings, ParametersDidNotTrain
from fedlora.privacy.units import build_units, poisson_batches
from fedlora.tasks import build_task
from fedlora.training import local_train, trainable


@pytest.fixture(scope="module")
def tiny():
    """tiny-bert classification with LoRA, all dropout off (deterministic gradients)."""
    config = cfg.load_config(None, ["model.name=tiny-bert", "lora.dropout=0.0", "model.max-length=32",
                                    "task.labels=" + ",".join(synthetic.LABELS)])
    task = build_task(config)
    loaded = load_model(config, task)
    for module in loaded.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    rows = synthetic.site_records(0, 4, 40)
    return loaded.model, task, task.encode(rows, loaded.tokenizer, 32), loaded.tokenizer.pad_token_id, rows


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(model, state):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def _per_example_grads(model, task, examples, pad_id):
    """The independent oracle: one backward pass per example, no Opacus."""
    batch = task.collate(examples, pad_id)
    model.train()
    out = []
    for i in range(len(examples)):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        task.per_example_loss(model, one).sum().backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return out


def dp_train(model, task, examples, pad_id, units, sigma, sample_rate, steps, lr=1e-3, mode="hooks", clip=1.0,
             **kwargs):
    """The training loop with DP-SGD as its step method."""
    return local_train(model, task, examples, pad_id, steps=steps, seed=0, learning_rate=lr,
                       extra_loss=kwargs.pop("extra_loss", None),
                       steps_method=DPSGD(units, sample_rate, sigma, DPSettings(clip, mode), **kwargs))


def _one_step(model, task, examples, pad_id, dp, optimizer):
    """One DP-SGD step on exactly `examples` (none: a noise-only step)."""
    dp.attach(model, optimizer)
    try:
        model.train()
        dp.zero_grad()
        dp.backward(task.per_example_loss(model, task.collate(examples, pad_id)) if examples else None)
        dp.step()
    finally:
        dp.detach(None)
        model.eval()


def _records(n):
    return build_units([{} for _ in range(n)], "", 1)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def test_per_sample_gradients_match_a_per_example_loop(tiny):
    model, task, examples, pad_id, _ = tiny
    batch_examples = examples[:6]
    expected = _per_example_grads(model, task, batch_examples, pad_id)
    dp = DPSGD(_records(6), 1.0, 0.0, DPSettings(1.0))
    dp.attach(model, torch.optim.SGD(trainable(model), lr=0.0))
    try:
        model.train()
        dp.backward(task.per_example_loss(model, task.collate(batch_examples, pad_id)))
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        for name, p in zip(names, trainable(model)):
            for i in range(len(batch_examples)):
                torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-4, atol=1e-6)
    finally:
        dp.detach(None)
        model.eval()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_step_applies_the_mean_of_clipped_per_sample_gradients(tiny, mode):
    model, task, examples, pad_id, _ = tiny
    batch_examples, clip = examples[:5], 0.05
    grads = _per_example_grads(model, task, batch_examples, pad_id)
    norms = [torch.sqrt(sum((g ** 2).sum() for g in per.values())) for per in grads]
    assert max(norms) > clip  # clipping is active
    expected = {n: sum(min(1.0, clip / float(nrm)) * per[n] for per, nrm in zip(grads, norms)) / len(grads)
                for n in grads[0]}
    before = _state(model)
    optimizer = torch.optim.SGD(trainable(model), lr=1.0)  # the step moves each tensor by -grad
    dp = DPSGD(_records(len(batch_examples)), 1.0, 0.0, DPSettings(clip, mode))  # expected batch: all 5
    _one_step(model, task, batch_examples, pad_id, dp, optimizer)
    for n, p in model.named_parameters():
        if n in expected:
            torch.testing.assert_close(before[n] - p.detach(), expected[n], rtol=1e-3, atol=1e-7)
    _restore(model, before)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_only_step_on_an_empty_batch_has_the_right_std(tiny, mode):
    model, task, _, pad_id, _ = tiny
    sigma, clip, expected_batch = 2.0, 0.5, 4.0
    before = _state(model)
    optimizer = torch.optim.SGD(trainable(model), lr=1.0)
    dp = DPSGD(_records(40), expected_batch / 40, sigma, DPSettings(clip, mode), torch.Generator().manual_seed(1))
    _one_step(model, task, [], pad_id, dp, optimizer)  # no records: noise only
    moved = torch.cat([(before[n] - p.detach()).flatten() for n, p in model.named_parameters() if n in before])
    assert moved.numel() > 4000
    target = sigma * clip / expected_batch
    # the std of a sample std over n normals is target / sqrt(2n): 5% is > 4 of those
    assert float(moved.std()) == pytest.approx(target, rel=0.05)
    assert abs(float(moved.mean())) < 4 * target / moved.numel() ** 0.5
    _restore(model, before)


def test_noise_is_drawn_in_opacus_secure_mode(tiny, monkeypatch):
    """Each noise value sums several Gaussian draws (the floating-point attack on a single draw)."""
    import opacus.optimizers.optimizer as opacus_optimizer

    model, task, _, pad_id, _ = tiny
    before = _state(model)
    calls = []
    real = opacus_optimizer._generate_noise

    def spy(*args, **kwargs):
        calls.append(kwargs.get("secure_mode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", spy)
    dp = DPSGD(_records(40), 0.1, 1.0, DPSettings(1.0), torch.Generator().manual_seed(1))
    _one_step(model, task, [], pad_id, dp, torch.optim.SGD(trainable(model), lr=1.0))
    assert calls and all(mode is True for mode in calls)  # one call per trainable tensor
    _restore(model, before)


def test_empty_batches_are_noised_steps_and_every_tensor_moves(tiny):
    model, task, examples, pad_id, rows = tiny
    before = _state(model)
    units = build_units(rows, "", 1)
    result = dp_train(model, task, examples, pad_id, units, 1.0, sample_rate=0.02, steps=30,
                      sampling_generator=torch.Generator().manual_seed(3))
    assert result.steps == 30 and result.empty_steps >= 5  # q·n = 0.8 records per batch
    assert all(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n in before)
    _restore(model, before)


def test_hooks_never_stack_on_the_cached_model(tiny):
    model, task, examples, pad_id, rows = tiny
    before, hooks_before = _state(model), _hook_count(model)
    units = build_units(rows, "", 1)
    for mode in ("hooks", "ghost", "hooks"):  # rounds, or sites served in turn by one process
        dp_train(model, task, examples, pad_id, units, 1.0, 0.2, 2, mode=mode)
        assert _hook_count(model) == hooks_before
        assert not hasattr(model, "autograd_grad_sample_hooks")
        assert not any(hasattr(p, attr) for p in model.parameters()
                       for attr in ("grad_sample", "summed_grad", "_forward_counter", "_norm_sample"))
    _restore(model, before)


def test_guard_refuses_an_update_when_a_tensor_did_not_train(tiny):
    model, task, examples, pad_id, rows = tiny
    units = build_units(rows, "", 1)
    with pytest.raises(ParametersDidNotTrain):  # lr 0: nothing moves, nothing may be released
        dp_train(model, task, examples, pad_id, units, 1.0, 0.2, 2, lr=0.0)


def test_patient_units_bound_each_patients_records_and_scale_the_noise(tiny):
    model, task, examples, pad_id, rows = tiny
    rows = [{**r, "patient-id": f"p{i // 4}"} for i, r in enumerate(rows)]  # 10 patients x 4 notes
    units = build_units(rows, "patient-id", 2)
    assert units.count == 10 and units.sensitivity_factor == 2 and units.describe().startswith("patient-id")
    for batch in poisson_batches(units, 0.5, 20, torch.Generator().manual_seed(0)):
        patients = [rows[i]["patient-id"] for i in batch]
        assert all(patients.count(p) <= 2 for p in patients)
    before = _state(model)
    result = dp_train(model, task, examples, pad_id, units, 1.5, 0.5, 2)
    assert result.details["noise_std"] == pytest.approx(1.5 * 2 * 1.0 / units.expected_records(0.5))
    _restore(model, before)
    with pytest.raises(ValueError, match="patient-id"):
        build_units([{"text": "x"}], "patient-id", 1)


def test_a_data_independent_term_is_added_after_the_noise(tiny):
    # FedProx's proximal term costs no privacy: its gradient joins after clipping and noise.
    model, task, examples, pad_id, rows = tiny
    before = _state(model)
    units = build_units(rows, "", 1)

    def pull(m):  # gradient 1 on every trainable coordinate
        return sum(p.sum() for p in m.parameters() if p.requires_grad)

    dp_train(model, task, examples, pad_id, units, 0.0, 1e-9, 3, extra_loss=pull)  # no records are sampled, no noise: only the extra term moves the weights
    for n, p in model.named_parameters():
        if n in before:  # AdamW on a constant gradient steps by lr each time
            torch.testing.assert_close(before[n] - p.detach(), torch.full_like(p, 3e-3), rtol=1e-3, atol=1e-6)
    _restore(model, before)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_causal_lm_trains_under_dp_sgd(mode):
    # Instruction tuning: the per-sequence loss covers each sequence's own completion tokens.
    config = cfg.load_config(None, ["model.name=tiny-llama", "task.type=causal-lm", "model.max-length=32"])
    task = build_task(config)
    loaded = load_model(config, task)
    rows = [{"prompt": f"Triage note {i}: chest pain.", "completion": " cardiology"} for i in range(12)]
    examples = task.encode(rows, loaded.tokenizer, 32)
    result = dp_train(loaded.model, task, examples, loaded.tokenizer.pad_token_id, build_units(rows, "", 1), 1.0,
                      0.5, 3, mode=mode)  # raises if a LoRA tensor did not move
    assert result.steps == 3 and result.records > 0
