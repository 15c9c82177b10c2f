"""Exporting an adapter whose strategy folded a correction into the base (FLoRA, FedEx-LoRA).

The final model is W0 + C + scale·B·A, and a PEFT adapter cannot carry a
change of the base weights. But C = U·V exactly (factored, or by SVD when it
is held dense), so the exported adapter is extended to rank r + R with
A' = [A; V] and B' = [B, U/scale], and lora_alpha set so that the scale stays
alpha/r: `PeftModel.from_pretrained(base, DIR/adapter)` then reproduces the
federated model exactly, with nothing but PEFT. Layers with a smaller
correction are zero-padded to the common R.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fedlora.strategies.correction import BaseCorrection
from fedlora.strategies.factors import factor_of


def fold_into_exported_adapter(directory: str | Path, correction: BaseCorrection, scale: float) -> int:
    """Rewrite a PEFT adapter in `directory` to include `correction`; returns its new rank."""
    directory = Path(directory)
    weights_path, config_path = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    tensors, config = load_file(str(weights_path)), json.loads(config_path.read_text())
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("folding a base correction into an adapter needs plain LoRA scaling (alpha / r)")
    factors = {layer: correction.factors(layer) for layer in correction.layers}
    extra = max(u.shape[1] for u, _ in factors.values())
    for key in list(tensors):
        found = factor_of(key)
        if found is None:
            continue
        layer, which = found
        u, v = factors.get(layer, (None, None))
        if which == "A":
            block = np.zeros((extra, tensors[key].shape[1]), np.float32)
            if v is not None:
                block[:v.shape[0]] = v
            tensors[key] = np.concatenate([tensors[key], block], axis=0)
        else:
            block = np.zeros((tensors[key].shape[0], extra), np.float32)
            if u is not None:
                block[:, :u.shape[1]] = u / scale
            tensors[key] = np.concatenate([tensors[key], block], axis=1)
    rank = int(config["r"]) + extra
    config.update(r=rank, lora_alpha=scale * rank)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(weights_path))
    config_path.write_text(json.dumps(config, indent=2))
    return rank
