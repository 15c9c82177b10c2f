"""DP-SGD on the trainable tensors (LoRA factors and task head) of a cached PEFT model.

Privacy is added the Opacus way, by wrapping, never by forking the training loop:
Opacus attaches its per-sample-gradient hooks to the model's modules and wraps
the optimizer (clip each sample, add Gaussian noise). The site's PeftModel is
cached for the whole process and may serve several simulated sites in turn, so
the hooks are attached without replacing the model object and removed when the
round ends: they never stack across rounds or sites.

The unit's loss is the task's per-sequence loss (one sample's gradient never
depends on another's length); batches come from Poisson sampling of privacy
units (units.py); an empty batch is still a step, with noise only, so every
drawn batch is accounted; after training, every trainable tensor must have
moved, or nothing is released (Opacus #820: adapters silently not training
while epsilon accrues).
"""

from __future__ import annotations

import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

from fedlora.privacy.units import PrivacyUnits, poisson_batches
from fedlora.tasks.base import Example, Task

log = logging.getLogger(__name__)

GRAD_SAMPLE_MODES = ("hooks", "ghost")


class ParametersDidNotTrain(RuntimeError):
    """A trainable tensor did not change during DP-SGD: the update would be wrong."""


@dataclass(frozen=True)
class DPSettings:
    max_grad_norm: float          # per-record clip norm C
    grad_sample_mode: str = "hooks"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0


@dataclass
class DPTrainResult:
    steps: int            # optimizer steps taken, every one noised (= batches drawn)
    empty_steps: int      # of which had no record (noise only)
    records: int          # records seen over all steps
    mean_loss: float      # local only: a training loss is not released under DP
    seconds: float
    noise_std: float      # std of the noise on each coordinate of the averaged gradient


def secret_generator() -> torch.Generator:
    """A generator seeded from the OS: noise and sampling must not be reproducible
    from anything in the run config, or the coordinator could subtract the noise."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def private(model, optimizer: torch.optim.Optimizer, settings: DPSettings, noise_multiplier: float,
            expected_batch_size: float, generator: torch.Generator) -> Iterator[tuple[object, object]]:
    """Attach Opacus to `model` and wrap `optimizer` for the duration of the block.

    `noise_multiplier` is relative to `settings.max_grad_norm` (the noise std is
    their product). Yields (hooks, dp_optimizer).
    """
    mode = settings.grad_sample_mode
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode {mode!r} not one of {GRAD_SAMPLE_MODES}")
    extra = {"max_grad_norm": settings.max_grad_norm, "use_ghost_clipping": True} if mode == "ghost" else {}
    hooks = prepare_module(model, mode, wrap_model=False, batch_first=True, loss_reduction="mean", **extra)
    try:
        dp_optimizer = get_optimizer_class("flat", False, mode)(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=settings.max_grad_norm,
            expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator)
        yield hooks, dp_optimizer
    finally:
        hooks.cleanup()  # removes the hooks and Opacus' per-parameter attributes
        for p in trainable(model):
            p.grad = None
            if hasattr(p, "summed_grad"):
                del p.summed_grad


def dp_step(model, task: Task, examples: list[Example], pad_id: int, hooks, dp_optimizer,
            mode: str) -> float | None:
    """One DP-SGD step on a batch of examples (possibly none). Returns the batch's mean
    loss, or None for a noise-only step."""
    dp_optimizer.zero_grad(set_to_none=True)
    if not examples:
        # No forward pass on zero rows; zero per-sample gradients make Opacus add noise only.
        for p in dp_optimizer.params:
            if mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        dp_optimizer.step()
        return None
    batch = task.collate(examples, pad_id)
    losses = task.per_example_loss(model, batch)
    if mode == "ghost":
        DPTensorFastGradientClipping(hooks, dp_optimizer, losses, "mean").backward()
    else:
        losses.mean().backward()
    dp_optimizer.step()
    return float(losses.detach().mean())


def dp_local_train(model, task: Task, examples: list[Example], units: PrivacyUnits, settings: DPSettings,
                   noise_multiplier: float, sample_rate: float, steps: int, pad_id: int, seed: int,
                   noise_generator: torch.Generator | None = None,
                   sampling_generator: torch.Generator | None = None, extra_loss=None) -> DPTrainResult:
    """`steps` DP-SGD steps with AdamW over Poisson samples of `units`.

    `noise_multiplier` is the accounted sigma per unit; the noise added is
    sigma · k · C, k = records one unit may put into a step (1 for records).
    `extra_loss(model)` is a data-independent term (e.g. FedProx's proximal
    term): its gradient is added after clipping and noise, which costs no privacy.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)  # dropout only; noise and sampling use secret generators
    params = trainable(model)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    expected = max(units.expected_records(sample_rate), 1e-6)
    effective_sigma = noise_multiplier * units.sensitivity_factor
    counted = 0
    empty = records = 0
    loss_sum, loss_batches = 0.0, 0

    def count(_optimizer) -> None:  # runs once per step, after clipping and noise
        nonlocal counted
        counted += 1
        if extra_loss is not None:
            for p, g in zip(params, torch.autograd.grad(extra_loss(model), params, allow_unused=True)):
                if g is not None:
                    p.grad = p.grad + g

    model.train()
    try:
        with private(model, optimizer, settings, effective_sigma, expected,
                     noise_generator or secret_generator()) as (hooks, dp_optimizer):
            dp_optimizer.attach_step_hook(count)
            for batch in poisson_batches(units, sample_rate, steps, sampling_generator or secret_generator()):
                loss = dp_step(model, task, [examples[i] for i in batch], pad_id, hooks, dp_optimizer,
                               settings.grad_sample_mode)
                records += len(batch)
                if loss is None:
                    empty += 1
                else:
                    loss_sum, loss_batches = loss_sum + loss, loss_batches + 1
    finally:
        model.eval()
    if counted != steps:
        raise RuntimeError(f"DP-SGD took {counted} noised steps, planned {steps}: accounting would be wrong")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p, b in zip(names, params, before) if torch.equal(p.detach(), b)]
    if frozen:
        raise ParametersDidNotTrain(f"{len(frozen)} trainable tensors did not change under DP-SGD "
                                    f"(first: {frozen[:3]}); the update is not released")
    return DPTrainResult(steps, empty, records, loss_sum / max(loss_batches, 1), time.perf_counter() - start,
                         effective_sigma * settings.max_grad_norm / expected)
