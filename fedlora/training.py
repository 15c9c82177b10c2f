"""The one local training loop, and the evaluation loops, shared by sites, the coordinator and benchmarks.

`local_train` takes `steps` AdamW steps on the model's trainable tensors (LoRA
factors and a task head). What a step is belongs to its `Steps` object:

- `PlainSteps` (the default): batches from successive shuffles of the rows,
  the mean per-example loss plus any extra term (FedProx's proximal term),
  gradient-norm clipping;
- `fedlora.privacy.dpsgd.DPSGD`: Poisson-sampled privacy units, per-unit
  clipping and Gaussian noise (Opacus), empty batches as noise-only steps, the
  extra term added after the noise.

Differential privacy wraps this loop, as Opacus' `make_private` wraps a model,
optimizer and data loader: the loop never knows whether it is private.
Batches go to the model's device; `precision` (fedlora.compute) runs the forward
passes under autocast, with loss scaling for fp16.
`LocalTraining` is the same loop one step at a time, for benchmarks that time
steps and interleave variants.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch

from fedlora.compute import autocast, grad_scaler, model_device, on_device
from fedlora.tasks.base import Example, Task

ExtraLoss = Callable[[torch.nn.Module], torch.Tensor]  # a data-independent term, e.g. FedProx's


@dataclass
class TrainResult:
    steps: int
    mean_loss: float      # over the non-empty batches; local only under DP (never released)
    seconds: float
    records: int = 0      # records seen over all steps
    empty_steps: int = 0  # steps whose batch held no record (DP-SGD's noise-only steps)
    details: dict[str, Any] = field(default_factory=dict)  # what the step method adds (DP: noise_std)


def planned_steps(num_examples: int, batch_size: float, local_epochs: float, local_steps: int) -> int:
    """Local steps of a round: `local_steps` when set, else enough batches for `local_epochs` passes."""
    if local_steps > 0:
        return local_steps
    return max(1, math.ceil(local_epochs * num_examples / batch_size))


def site_seed(train_seed: int, site_index: int, server_round: int) -> int:
    """The seed of one site's local training in one round (dropout and plain batch order)."""
    return train_seed * 1_000_003 + site_index * 10_007 + server_round


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def shuffled_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Index batches from successive shuffles of range(n)."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, n):
            order += torch.randperm(n, generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


class Steps(Protocol):
    """How the loop draws batches and turns one into an optimizer step."""

    def attach(self, model, optimizer: torch.optim.Optimizer, extra_loss: ExtraLoss | None) -> None: ...
    def batches(self, steps: int) -> Iterator[list[int]]: ...
    def zero_grad(self) -> None: ...
    def backward(self, losses: torch.Tensor | None) -> None: ...  # None: a batch without records
    def step(self) -> None: ...
    def detach(self, completed_steps: int | None) -> dict[str, Any]: ...  # None: the loop failed


class PlainSteps:
    """Non-private steps: shuffled batches, mean loss (+ extra term), gradient-norm clipping."""

    def __init__(self, num_examples: int, batch_size: int, max_grad_norm: float, generator: torch.Generator,
                 scaler: torch.amp.GradScaler | None = None):
        self.num_examples, self.batch_size, self.max_grad_norm = num_examples, batch_size, max_grad_norm
        self.generator, self.scaler = generator, scaler

    def attach(self, model, optimizer, extra_loss) -> None:
        self.model, self.optimizer, self.extra_loss = model, optimizer, extra_loss
        self.params = trainable(model)

    def batches(self, steps: int) -> Iterator[list[int]]:
        return shuffled_batches(self.num_examples, self.batch_size, steps, self.generator)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, losses: torch.Tensor | None) -> None:
        loss = losses.mean()
        if self.extra_loss is not None:
            loss = loss + self.extra_loss(self.model)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)

    def step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:  # skips a step whose gradients overflowed, and adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def detach(self, completed_steps: int | None) -> dict[str, Any]:
        return {}


class LocalTraining:
    """The loop, one step at a time: `with LocalTraining(...) as loop: loop.step()...`, then `loop.result()`
    (or `start()`, `step()`..., `finish()` where a `with` block does not fit, as in a benchmark that
    interleaves variants).

    `steps_method` is `PlainSteps` by default; pass `fedlora.privacy.dpsgd.DPSGD` for DP-SGD.
    """

    def __init__(self, model, task: Task, examples: list[Example], pad_id: int, *, steps: int, seed: int,
                 learning_rate: float, weight_decay: float = 0.0, batch_size: int = 16, max_grad_norm: float = 0.0,
                 extra_loss: ExtraLoss | None = None, steps_method: Steps | None = None, precision: str = "fp32"):
        if precision == "fp16" and steps_method is not None:
            raise ValueError("train.precision = fp16 scales the loss, which a step method such as DP-SGD's "
                             "per-sample clipping does not take; use bf16")
        self.model, self.task, self.examples, self.pad_id = model, task, examples, pad_id
        self.precision = precision
        self.steps, self.seed = steps, seed
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.extra_loss = extra_loss
        self._method = steps_method
        self._batch_size, self._max_grad_norm = batch_size, max_grad_norm
        self.taken = self.records = self.empty_steps = 0
        self._loss_sum, self._loss_batches = 0.0, 0

    def __enter__(self) -> "LocalTraining":
        return self.start()

    def __exit__(self, kind, error, traceback) -> None:
        self.finish(failed=kind is not None)

    def start(self) -> "LocalTraining":
        self._started = time.perf_counter()
        torch.manual_seed(self.seed)  # LoRA dropout (DP-SGD draws its noise and batches from secret generators)
        generator = torch.Generator().manual_seed(self.seed)
        self.optimizer = torch.optim.AdamW(trainable(self.model), lr=self.learning_rate,
                                           weight_decay=self.weight_decay)
        self.device = model_device(self.model)
        self.method = self._method or PlainSteps(len(self.examples), self._batch_size, self._max_grad_norm, generator,
                                                 grad_scaler(self.device, self.precision))
        self.method.attach(self.model, self.optimizer, self.extra_loss)
        self._batches = self.method.batches(self.steps)
        self.model.train()
        return self

    def step(self, batch: list[int] | None = None) -> float | None:
        """One optimizer step on the next batch (or on `batch`, indices into the examples);
        returns the batch's mean loss, None for a batch without records."""
        batch = next(self._batches) if batch is None else batch
        self.method.zero_grad()
        loss = None
        if batch:
            collated = on_device(self.task.collate([self.examples[i] for i in batch], self.pad_id), self.device)
            with autocast(self.device, self.precision):
                losses = self.task.per_example_loss(self.model, collated)
            loss = float(losses.detach().mean())
            self._loss_sum, self._loss_batches = self._loss_sum + loss, self._loss_batches + 1
            self.method.backward(losses)
        else:
            self.empty_steps += 1
            self.method.backward(None)
        self.method.step()
        self.taken += 1
        self.records += len(batch)
        return loss

    def finish(self, failed: bool = False) -> None:
        """Detach the step method (after a completed loop it checks what it must) and set eval mode."""
        self.model.eval()
        self.details = self.method.detach(None if failed else self.taken)

    def result(self) -> TrainResult:
        return TrainResult(self.taken, self._loss_sum / max(self._loss_batches, 1),
                           time.perf_counter() - self._started, self.records, self.empty_steps, self.details)


def local_train(model, task: Task, examples: list[Example], pad_id: int, *, steps: int, seed: int,
                learning_rate: float, weight_decay: float = 0.0, batch_size: int = 16, max_grad_norm: float = 0.0,
                extra_loss: ExtraLoss | None = None, steps_method: Steps | None = None,
                precision: str = "fp32") -> TrainResult:
    """`steps` optimizer steps of local training (plain, or as `steps_method` takes them)."""
    with LocalTraining(model, task, examples, pad_id, steps=steps, seed=seed, learning_rate=learning_rate,
                       weight_decay=weight_decay, batch_size=batch_size, max_grad_norm=max_grad_norm,
                       extra_loss=extra_loss, steps_method=steps_method, precision=precision) as loop:
        for _ in range(steps):
            loop.step()
    return loop.result()


def plain_train(model, task: Task, examples: list[Example], train_cfg, pad_id: int, seed: int,
                extra_loss: ExtraLoss | None = None) -> TrainResult:
    """Non-private local training as the `[train]` section configures it."""
    steps = planned_steps(len(examples), train_cfg.batch_size, train_cfg.local_epochs, train_cfg.local_steps)
    return local_train(model, task, examples, pad_id, steps=steps, seed=seed, learning_rate=train_cfg.learning_rate,
                       weight_decay=train_cfg.weight_decay, batch_size=train_cfg.batch_size,
                       max_grad_norm=train_cfg.max_grad_norm, extra_loss=extra_loss, precision=train_cfg.precision)


@torch.no_grad()
def evaluate_counts(model, task: Task, examples: list[Example], pad_id: int, batch_size: int = 64,
                    tokenizer=None, precision: str = "fp32") -> dict[str, Any]:
    """The task's evaluation counts over `examples`; with the tokenizer, also those of what the model
    generates (Task.generation_counts: a causal LM's ROUGE-L, BLEU and chrF)."""
    model.eval()
    device = model_device(model)
    counts: dict[str, Any] = {}
    with autocast(device, precision):
        for batch in _batches_on(device, task, examples, pad_id, batch_size):
            task.add_counts(counts, task.eval_counts(model, batch))
        if tokenizer is not None and examples:
            task.add_counts(counts, task.generation_counts(model, examples, tokenizer))
    return counts


@torch.no_grad()
def predict_labels(model, task, examples: list[Example], pad_id: int, batch_size: int = 64,
                   precision: str = "fp32") -> list[int]:
    model.eval()
    device = model_device(model)
    out: list[int] = []
    with autocast(device, precision):
        for batch in _batches_on(device, task, examples, pad_id, batch_size):
            out += task.predict(model, batch).tolist()
    return out


def _batches_on(device: torch.device, task: Task, examples: list[Example], pad_id: int,
                batch_size: int) -> Iterator[dict[str, Any]]:
    """`examples` in order, `batch_size` at a time, collated and on `device`."""
    for i in range(0, len(examples), batch_size):
        yield on_device(task.collate(examples[i:i + batch_size], pad_id), device)
