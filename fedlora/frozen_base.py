"""Setting the frozen base weights of the adapted layers to W0 + C, restorably.

FLoRA and FedEx-LoRA fold a correction C into the frozen weights (see
fedlora/strategies/correction.py). A process caches one model and serves many
messages (a Ray actor may serve several sites in turn, over several rounds),
so a correction must never linger: the first time a model's base is changed,
pristine copies W0 of its adapted layers' weights are kept, and every message
then sets W = W0 + C from scratch — or W = W0 when the message carries no C.
The copies cost one adapted layer's weights each (all-MiniLM-L6-v2 with LoRA on
query and value: 12 × 384 × 384 floats, 7 MB).
"""

from __future__ import annotations

import weakref

import torch

from fedlora.strategies.correction import BaseCorrection
from fedlora.strategies.factors import lora_layers


class _Pristine:
    def __init__(self, model):
        self.modules = {layer: model.get_submodule(layer)
                        for layer in lora_layers(name for name, _ in model.named_parameters())}
        self.weights = {layer: m.get_base_layer().weight.detach().clone() for layer, m in self.modules.items()}
        self.modified = False


_PRISTINE: "weakref.WeakKeyDictionary[object, _Pristine]" = weakref.WeakKeyDictionary()


def set_base_correction(model, correction: BaseCorrection | None) -> None:
    """W = W0 + C on every adapted layer named in `correction`, W = W0 everywhere else."""
    pristine = _PRISTINE.get(model)
    if pristine is None:
        if not correction:
            return  # never modified: nothing to restore
        pristine = _PRISTINE[model] = _Pristine(model)
    elif not correction and not pristine.modified:
        return
    unknown = set(correction.layers) - set(pristine.modules) if correction else set()
    if unknown:
        raise ValueError(f"base correction names layers the model does not adapt: {sorted(unknown)[:3]}")
    with torch.no_grad():
        for layer, w0 in pristine.weights.items():
            weight = pristine.modules[layer].get_base_layer().weight
            if correction and layer in correction.layers:
                c = torch.from_numpy(correction.dense(layer))
                if getattr(pristine.modules[layer], "fan_in_fan_out", False):
                    c = c.T  # Conv1D (GPT-2) stores W as in × out
                weight.copy_(w0 + c.to(w0.device, w0.dtype))
            else:
                weight.copy_(w0)
    pristine.modified = bool(correction)
