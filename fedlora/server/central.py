"""The coordinator's own copy of the model: central test evaluation and export."""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.arrays import State
from fedlora.data.sites import central_test_set
from fedlora.models import LoadedModel, export_adapter, set_trainable_state
from fedlora.server.model_card import write_model_card
from fedlora.tasks.base import Task
from fedlora.training import evaluate_counts, predict_labels


class CentralEvaluator:
    """`simulated_sites`: the sites read the run's data (a simulation), so the synthetic corpus'
    test set is theirs when data.path is empty; deployed sites read their own files, and without
    data.test-path the coordinator has no test set of theirs (fedlora.data.sites.central_test_set)."""

    def __init__(self, config, task: Task, loaded: LoadedModel, simulated_sites: bool):
        self.config = config
        self.task = task
        self.loaded = loaded
        self.test_set = central_test_set(config, task, simulated_sites)
        rows = self.test_set.rows
        self.test_examples = task.encode(rows, loaded.tokenizer, config.model.max_length) if rows else []

    @property
    def has_test_set(self) -> bool:
        return bool(self.test_examples)

    @property
    def pad_id(self) -> int:
        return self.loaded.tokenizer.pad_token_id

    def evaluate(self, state: State) -> dict[str, float]:
        """`test_*` figures of an adapter on the central test set."""
        set_trainable_state(self.loaded.model, state)
        counts = evaluate_counts(self.loaded.model, self.task, self.test_examples, self.pad_id,
                                 tokenizer=self.loaded.tokenizer, precision=self.config.train.precision)
        return {k.replace("eval_", "test_", 1): v for k, v in self.task.metrics(counts).items()}

    def write_predictions(self, state: State, path: Path) -> None:
        """Each central test row's predicted label, for checking the exported adapter; without a
        central test set, none (and none left from an earlier run in the same directory)."""
        if not self.has_test_set or not hasattr(self.task, "predict"):
            Path(path).unlink(missing_ok=True)
            return
        set_trainable_state(self.loaded.model, state)
        preds = predict_labels(self.loaded.model, self.task, self.test_examples, self.pad_id,
                               precision=self.config.train.precision)
        with Path(path).open("w") as fh:
            for i, (row, p) in enumerate(zip(self.test_set.rows, preds)):
                fh.write(json.dumps({"index": i, "label": str(row[self.task.label_column]),
                                     "prediction": self.task.labels[p]}) + "\n")

    def export(self, state: State, directory: Path) -> Path:
        """The adapter in PEFT format, its label names (labels.json) and a model card; the card
        gains the run's figures once the summary exists (fedlora.server.model_card)."""
        set_trainable_state(self.loaded.model, state)
        out = export_adapter(self.loaded.model, directory, self.config.model.name, getattr(self.task, "labels", None))
        write_model_card(out, self.config)
        return out
