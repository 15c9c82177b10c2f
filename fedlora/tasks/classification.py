"""Sequence classification: text -> one of a fixed list of labels."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fedlora.tasks.base import Batch, Example, Task, pad_to


class ClassificationTask(Task):
    peft_task_type = "SEQ_CLS"

    def __init__(self, text_column: str, label_column: str, labels: list[str]):
        self.text_column = text_column
        self.label_column = label_column
        self.labels = list(labels)
        self.index = {name: i for i, name in enumerate(self.labels)}

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def check_row(self, row: dict) -> str | None:
        text = row.get(self.text_column)
        if not isinstance(text, str):
            return f"column {self.text_column!r} missing or not text"
        if not text.strip():
            return f"column {self.text_column!r} is empty"
        label = row.get(self.label_column)
        if label is None or str(label) == "":
            return f"column {self.label_column!r} missing"
        if self.labels and str(label) not in self.index:
            return f"label {label!r} is not one of task.labels ({', '.join(self.labels)})"
        return None

    def encode(self, rows: list[dict], tokenizer, max_length: int) -> list[Example]:
        enc = tokenizer([r[self.text_column] for r in rows], truncation=True, max_length=max_length)
        return [{"input_ids": ids, "label": self.index[str(r[self.label_column])]}
                for ids, r in zip(enc["input_ids"], rows)]

    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        ids = pad_to([e["input_ids"] for e in examples], pad_id)
        return {
            "input_ids": ids,
            "attention_mask": (ids != pad_id).long() if pad_id is not None else torch.ones_like(ids),
            "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long),
        }

    def _logits(self, model, batch: Batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def per_example_loss(self, model, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch), batch["labels"], reduction="none")

    def predict(self, model, batch: Batch) -> torch.Tensor:
        return self._logits(model, batch).argmax(-1)

    def eval_counts(self, model, batch: Batch) -> dict[str, Any]:
        logits = self._logits(model, batch)
        y = batch["labels"]
        pred = logits.argmax(-1)
        k = self.num_labels
        tp = [int(((pred == c) & (y == c)).sum()) for c in range(k)]
        fp = [int(((pred == c) & (y != c)).sum()) for c in range(k)]
        fn = [int(((pred != c) & (y == c)).sum()) for c in range(k)]
        return {
            "loss_sum": float(F.cross_entropy(logits, y, reduction="sum")),
            "count": int(y.numel()),
            "correct": int((pred == y).sum()),
            "tp": tp, "fp": fp, "fn": fn,
            "confusion": torch.bincount(y * k + pred, minlength=k * k).tolist(),  # row: true label, column: predicted
        }

    def metrics(self, counts: dict[str, Any]) -> dict[str, float]:
        n = max(counts.get("count", 0), 1)
        return {
            "eval_loss": counts["loss_sum"] / n,
            "eval_accuracy": counts["correct"] / n,
            "eval_macro_f1": macro_f1(counts["tp"], counts["fp"], counts["fn"]),
        }

    def details(self, counts: dict[str, Any]) -> dict[str, Any]:
        """Per-class precision, recall, F1 and support, and the confusion matrix (rows: true labels,
        columns: predicted), from counts pooled exactly like the metrics."""
        k = self.num_labels
        per_class = {}
        for c, name in enumerate(self.labels):
            tp, fp, fn = counts["tp"][c], counts["fp"][c], counts["fn"][c]
            precision = tp / (tp + fp) if tp + fp else None  # never predicted: undefined, not 0
            recall = tp / (tp + fn) if tp + fn else None      # absent from the labels: undefined
            f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
            per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
        out: dict[str, Any] = {"per_class": per_class}
        if len(counts.get("confusion", [])) == k * k:
            flat = counts["confusion"]
            out["confusion"] = [flat[i * k:(i + 1) * k] for i in range(k)]
        return out


def macro_f1(tp: list[int], fp: list[int], fn: list[int]) -> float:
    """Mean F1 over classes present in the labels or the predictions."""
    scores = []
    for t, p, n in zip(tp, fp, fn):
        if t + p + n == 0:
            continue  # class absent from both: no information, not a perfect score
        scores.append(2 * t / (2 * t + p + n))
    return sum(scores) / len(scores) if scores else 0.0
