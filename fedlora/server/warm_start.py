"""Starting a run from an adapter a previous run exported (`model.warm-start`).

The coordinator reads the adapter (a run directory's `adapter/`, or any PEFT
adapter folder) into its model and sends it to the sites as the round-1 global
model; nothing else carries over. Resuming (`output.resume`) is different: it
continues the same run from its checkpoint, rounds, strategy state and all.

The adapter must fit the run: the same base model, LoRA rank and target
modules, and (classification) the same labels in the same order, checked
against the folder's adapter_config.json and labels.json before any weight is
read, each mismatch named.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from peft.utils import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedlora.models import LABELS_FILE, hub_base_name, read_labels, trainable_state
from fedlora.strategies import STRATEGIES

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


class WarmStartError(ValueError):
    """The adapter to start from is missing, unreadable or does not fit the run."""


@dataclass
class WarmStart:
    state: dict          # the trainable tensors, as the coordinator's model names them
    folder: Path
    sha256: str          # of the weights file: which adapter this run descends from
    scores: dict = field(default_factory=dict)  # the adapter on the central test set, before round 1

    def summary(self) -> dict:
        return {"adapter": str(self.folder), "sha256": self.sha256, **self.scores}


def adapter_folder(path: str | Path, key: str = "model.warm-start") -> Path:
    """A run directory's adapter/, or the folder itself when it holds an adapter."""
    path = Path(path).expanduser()
    for folder in (path / "adapter", path):
        if (folder / WEIGHTS).is_file():
            return folder
    raise WarmStartError(f"{key}: no adapter at {path} (neither {path / 'adapter' / WEIGHTS} "
                         f"nor {path / WEIGHTS})")


def mismatches(saved: dict, labels: list[str] | None, config, model) -> list[str]:
    """What in the saved adapter's config (and labels) differs from this run's."""
    ours = model.peft_config["default"]
    problems = []
    if saved.get("base_model_name_or_path") != hub_base_name(config.model.name):
        problems.append(f"base model {saved.get('base_model_name_or_path')!r}, this run's is "
                        f"{hub_base_name(config.model.name)!r}")
    if saved.get("r") != ours.r:
        problems.append(f"LoRA rank {saved.get('r')}, this run's is {ours.r}")
    if saved.get("lora_alpha") != ours.lora_alpha or bool(saved.get("use_rslora")) != bool(ours.use_rslora):
        problems.append(f"LoRA alpha {saved.get('lora_alpha')} (rsLoRA {bool(saved.get('use_rslora'))}), this run's "
                        f"is {ours.lora_alpha} (rsLoRA {bool(ours.use_rslora)}): the adapter would be scaled otherwise")
    if saved.get("task_type") != ours.task_type:
        problems.append(f"task type {saved.get('task_type')}, this run's is {ours.task_type}")
    if sorted(saved.get("target_modules") or []) != sorted(ours.target_modules or []):
        problems.append(f"target modules {sorted(saved.get('target_modules') or [])}, this run's are "
                        f"{sorted(ours.target_modules or [])}")
    if config.task.type == "classification":
        if labels is None:
            problems.append(f"no {LABELS_FILE}: the order of its head's labels is unknown")
        elif labels != list(config.task.labels):
            problems.append(f"labels {labels}, this run's are {list(config.task.labels)}")
    return problems


def load_warm_start(path: str | Path, config, model, key: str = "model.warm-start") -> WarmStart:
    """The adapter at `path` loaded into `model` (the coordinator's PEFT model); its trainable state.
    `key` names the setting in errors (model.compare-with reads its adapter the same way)."""
    if getattr(STRATEGIES.get(config.strategy.name), "local_b", False):
        raise WarmStartError(f"{key}: an adapter does not fit this run: strategy {config.strategy.name} "
                             "keeps B at each site, which starts from zero, so the adapter's B would stay at the "
                             "coordinator, untrained")
    folder = adapter_folder(path, key).resolve()
    try:
        saved = json.loads((folder / CONFIG).read_text())
        labels = read_labels(folder)
    except (OSError, ValueError, KeyError) as err:
        raise WarmStartError(f"{key}: cannot read {folder / CONFIG} or {LABELS_FILE}: {err}") from None
    problems = mismatches(saved, labels, config, model)
    if problems:
        raise WarmStartError(f"{key}: the adapter in {folder} does not fit this run: "
                             + "; ".join(problems))
    weights = folder / WEIGHTS
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as err:
        raise WarmStartError(f"{key}: cannot read {weights}: {err}") from None
    before = trainable_state(model)
    try:
        result = set_peft_model_state_dict(model, tensors)
    except RuntimeError as err:  # a tensor of another shape
        raise WarmStartError(f"{key}: {weights} does not fit this run's model: {err}") from None
    missing_keys = set(result.missing_keys)
    loaded = {k for k in before if k not in missing_keys}
    if loaded != set(before) or result.unexpected_keys:
        missing = sorted(set(before) - loaded)
        raise WarmStartError(f"{key}: {weights} lacks {len(missing)} of this run's tensors "
                             f"(first: {missing[:2]}) or holds others ({sorted(result.unexpected_keys)[:2]})")
    return WarmStart(trainable_state(model), folder, hashlib.sha256(weights.read_bytes()).hexdigest())
