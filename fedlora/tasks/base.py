"""The interface the trainer and evaluators use, whatever the task."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

Example = dict[str, list[int] | int]
Batch = dict[str, torch.Tensor]


class Task(ABC):
    #: PEFT task type, which also decides the transformers auto class.
    peft_task_type: str

    @abstractmethod
    def check_row(self, row: dict) -> str | None:
        """The problem with a row, or None when it can be used."""

    @abstractmethod
    def encode(self, rows: list[dict], tokenizer, max_length: int) -> list[Example]:
        """Token ids (and targets) for each row."""

    @abstractmethod
    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        """Pad a list of examples into tensors."""

    @abstractmethod
    def per_example_loss(self, model, batch: Batch) -> torch.Tensor:
        """One loss per example, shape [batch]. Each depends on that example only,
        which is what DP-SGD's per-sample clipping needs."""

    @abstractmethod
    def eval_counts(self, model, batch: Batch) -> dict[str, Any]:
        """Sums over the batch that `metrics` turns into figures; sums pool exactly across sites."""

    @abstractmethod
    def metrics(self, counts: dict[str, Any]) -> dict[str, float]:
        """`eval_*` figures from pooled counts."""

    def generation_counts(self, model, examples: list[Example], tokenizer) -> dict[str, Any]:
        """Sums over what the model generates for some of the examples (causal LM: ROUGE-L, BLEU, chrF),
        pooled like `eval_counts`; none by default."""
        return {}

    def details(self, counts: dict[str, Any]) -> dict[str, Any]:
        """Figures beyond `metrics` that the counts allow (classification: per class); none by default."""
        return {}

    @staticmethod
    def add_counts(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
        for key, value in part.items():
            if isinstance(value, list):
                old = total.get(key, [0] * len(value))
                total[key] = [a + b for a, b in zip(old, value)]
            else:
                total[key] = total.get(key, 0) + value
        return total


def pad_to(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)
