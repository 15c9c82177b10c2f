"""The exported adapter's model card (adapter/README.md), in place of PEFT's empty template.

Written from what the coordinator already has: the adapter folder itself (adapter_config.json,
labels.json), the run's configuration and, once the rounds are over, its summary.json (strategy,
rounds, the sites it saw, privacy guarantees, final metrics, library versions). Nothing more is
asked of the sites. The "How to use with PEFT" snippet needs only transformers and peft.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.models import LABELS_FILE, read_labels

CARD = "README.md"


def _yaml_value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and lists are valid YAML


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def privacy_lines(privacy: dict[str, Any] | None) -> list[str]:
    """One line per guarantee the run gives, or "none" when differential privacy was off."""
    privacy = privacy or {}
    lines = []
    site = privacy.get("site_level") or {}
    if site.get("enabled"):
        unit = ", ".join(site.get("unit") or ["record"])
        lines.append(f"site-level DP (each site protects one {unit} of its data): epsilon "
                     f"{_fmt(site.get('epsilon'))}, delta {_fmt(site.get('delta'))}, accountant "
                     f"{site.get('accountant')}")
    client = privacy.get("client_level")
    if client:
        lines.append(f"client-level DP (unit: {client.get('unit', 'site')}): epsilon {_fmt(client.get('epsilon'))}, "
                     f"delta {_fmt(client.get('delta'))}, {client.get('clipping', '')} clipping")
    return lines or ["none (differential privacy was off)"]


def _usage(base: str, task_type: str, labels: list[str], max_length: int | None) -> str:
    trunc = f", truncation=True, max_length={max_length}" if max_length else ", truncation=True"
    if task_type == "SEQ_CLS":
        return f'''```python
import json
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import PeftModel

adapter = "path/to/adapter"  # this folder
labels = json.load(open(f"{{adapter}}/{LABELS_FILE}"))  # {{"id2label": ..., "label2id": ...}}
id2label = {{int(i): name for i, name in labels["id2label"].items()}}  # JSON keys are strings
base = AutoModelForSequenceClassification.from_pretrained("{base}", id2label=id2label,
                                                          label2id=labels["label2id"])
model = PeftModel.from_pretrained(base, adapter).eval()  # LoRA factors and the classification head
tokenizer = AutoTokenizer.from_pretrained("{base}")
inputs = tokenizer("some text", return_tensors="pt"{trunc})
prediction = model(**inputs).logits.argmax(-1).item()
print(base.config.id2label[prediction])  # one of: {", ".join(labels)}
```'''
    return f'''```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/adapter").eval()
tokenizer = AutoTokenizer.from_pretrained("{base}")
inputs = tokenizer("some text", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))
```'''


def render(directory: Path, config=None, summary: dict[str, Any] | None = None) -> str:
    directory = Path(directory)
    adapter = json.loads((directory / "adapter_config.json").read_text())
    labels = read_labels(directory) or []
    summary = summary or {}
    base, task_type = adapter.get("base_model_name_or_path"), adapter.get("task_type")
    classification = task_type == "SEQ_CLS"
    tags = ["fedlora", "peft", "lora", "federated-learning", "text-classification" if classification else "causal-lm"]
    front = {"library_name": "peft", "base_model": base, "tags": tags,
             "pipeline_tag": "text-classification" if classification else "text-generation"}
    if labels:
        front["label_names"] = labels
    out = ["---", *(f"{k}: {_yaml_value(v)}" for k, v in front.items()), "---", "",
           f"# Federated LoRA adapter for {base}", "",
           "Trained with fedlora (federated LoRA fine-tuning on Flower): each site fine-tuned on its own "
           "data and the coordinator aggregated only the adapter updates. This folder is a plain PEFT "
           "adapter; using it needs transformers and peft only.", "",
           "## Training", "",
           f"- Task: {'sequence classification' if classification else 'causal language modelling'}",
           f"- Base model: `{base}`"]
    if labels:
        out.append("- Labels, in order (id: name): " + ", ".join(f"{i}: {n}" for i, n in enumerate(labels)))
    targets = adapter.get("target_modules") or []
    targets = sorted(targets) if isinstance(targets, list) else [targets]
    out.append(f"- LoRA: rank {adapter.get('r')}, alpha {_fmt(adapter.get('lora_alpha'))}, "
               f"targets {', '.join(targets) or 'PEFT default'}; trained head: "
               f"{', '.join(adapter.get('modules_to_save') or []) or 'none'}")
    strategy = summary.get("strategy") or (config.strategy.name if config is not None else None)
    if strategy:
        out.append(f"- Strategy: {strategy}")
    rounds = summary.get("rounds", config.federation.rounds if config is not None else None)
    if rounds is not None:
        out.append(f"- Rounds: {rounds}")
    if config is not None:
        out.append(f"- Secure aggregation: {'on' if config.secagg.enabled else 'off'}")
    if "sites" in summary:
        sites = summary["sites"]
        if sites:
            described = [name + (" (" + ", ".join(f"{k} {_fmt(v)}" for k, v in info.items()) + ")"
                                 if isinstance(info, dict) and info else "") for name, info in sorted(sites.items())]
            out.append(f"- Sites ({len(sites)}): " + "; ".join(described))
        else:
            out.append("- Sites: not recorded (under client-level DP which sites took part is secret)")
    if summary:
        out += ["", "## Privacy", "", *(f"- {line}" for line in privacy_lines(summary.get("privacy")))]
        final = summary.get("final") or {}
        # pooled figures only: each site's own (eval_sites) and the per-class counts stay in the run directory
        site_metrics = {k: v for k, v in final.items() if k.startswith("eval_") and _scalar(v)}
        central = {k: v for k, v in final.items() if k.startswith("test_") and _scalar(v)}
        if site_metrics or central:
            out += ["", "## Results (final round)", ""]
            if site_metrics:
                out.append("- Sites' own evaluation, aggregated: "
                           + ", ".join(f"{k[5:]} {_fmt(v)}" for k, v in site_metrics.items()))
            if central:
                about = (summary.get("central_test") or {}).get("about")
                out.append("- Central test set: " + ", ".join(f"{k[5:]} {_fmt(v)}" for k, v in central.items())
                           + (f" ({about})" if about else ""))
        versions = summary.get("versions") or {}
        if versions:
            out += ["", "## Library versions", "", ", ".join(f"{k} {v}" for k, v in versions.items())]
    out += ["", "## How to use with PEFT", ""]
    if labels:
        out += [f"The label names are in `{LABELS_FILE}` as `id2label` / `label2id` (ids as "
                "JSON strings); pass them to `from_pretrained` so predictions decode to names:", ""]
    out.append(_usage(base, task_type, labels, config.model.max_length if config is not None else None))
    if config is not None and config.model.name.startswith("tiny-"):
        out += ["", f"`{base}` is a built-in random test model of fedlora (fedlora.models.load_base_model), "
                "not a hub checkpoint."]
    return "\n".join(out) + "\n"


def write_model_card(directory: str | Path, config=None, summary: dict[str, Any] | str | Path | None = None) -> Path:
    """Replace PEFT's template README.md in the adapter folder with this run's card; `summary`:
    the run's summary (a dict, or the path of summary.json)."""
    if isinstance(summary, (str, Path)):
        summary = json.loads(Path(summary).read_text())
    path = Path(directory) / CARD
    path.write_text(render(Path(directory), config, summary))
    return path
