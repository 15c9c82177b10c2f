"""Local training and evaluation loops, shared by sites and the coordinator."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.tasks.base import Example, Task


@dataclass
class TrainResult:
    steps: int
    mean_loss: float
    seconds: float


def planned_steps(num_examples: int, batch_size: int, local_epochs: float, local_steps: int) -> int:
    if local_steps > 0:
        return local_steps
    return max(1, math.ceil(local_epochs * num_examples / batch_size))


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Index batches from successive shuffles of range(n)."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, n):
            order += torch.randperm(n, generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def local_train(model, task: Task, examples: list[Example], train_cfg, pad_id: int, seed: int,
                extra_loss=None) -> TrainResult:
    """Plain (non-private) local training of the trainable tensors with AdamW.

    `extra_loss(model)` adds a term to every step's loss (e.g. FedProx's proximal term).
    """
    start = time.perf_counter()
    torch.manual_seed(seed)  # LoRA dropout
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
    steps = planned_steps(len(examples), train_cfg.batch_size, train_cfg.local_epochs, train_cfg.local_steps)
    model.train()
    total = 0.0
    for index in _batches(len(examples), train_cfg.batch_size, steps, generator):
        batch = task.collate([examples[i] for i in index], pad_id)
        loss = task.per_example_loss(model, batch).mean()
        total += float(loss.detach())
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
        optimizer.step()
    model.eval()
    return TrainResult(steps, total / steps, time.perf_counter() - start)


@torch.no_grad()
def evaluate_counts(model, task: Task, examples: list[Example], pad_id: int, batch_size: int = 64) -> dict[str, Any]:
    model.eval()
    counts: dict[str, Any] = {}
    for i in range(0, len(examples), batch_size):
        task.add_counts(counts, task.eval_counts(model, task.collate(examples[i:i + batch_size], pad_id)))
    return counts


@torch.no_grad()
def predict_labels(model, task, examples: list[Example], pad_id: int, batch_size: int = 64) -> list[int]:
    model.eval()
    out: list[int] = []
    for i in range(0, len(examples), batch_size):
        out += task.predict(model, task.collate(examples[i:i + batch_size], pad_id)).tolist()
    return out
