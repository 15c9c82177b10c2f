"""What the aggregation strategy asks of a site, message by message.

The coordinator's instructions in the message (fedlora/wire.py: FREEZE_LORA_A,
LOCAL_LORA_B, PROXIMAL_MU, the BASE_CORRECTION record) and the site's own rank
decide which adapter the site starts from, how it trains and what it sends.
The cached model is set completely by every message — base correction,
adapter at the site's rank, the site's own B — and trainable flags are
restored after training, so nothing carries over to the next message, round
or site served by the same process.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Context, Message

from fedlora import wire
from fedlora.arrays import State, from_record
from fedlora.client.personal import load_personal, save_personal
from fedlora.client.runtime import SiteRuntime
from fedlora.compute import model_device
from fedlora.frozen_base import set_base_correction
from fedlora.models import frozen, set_trainable_state, trainable_state
from fedlora.strategies.correction import BaseCorrection
from fedlora.strategies.factors import is_factor, truncate, uploaded
from fedlora.strategies.fedprox import proximal_term


@dataclass
class SitePlan:
    rt: SiteRuntime
    context: Context
    freeze_a: bool = False
    local_b: bool = False
    proximal_mu: float = 0.0

    @classmethod
    def for_message(cls, rt: SiteRuntime, msg: Message, context: Context) -> "SitePlan":
        config = msg.content[wire.CONFIG]
        return cls(rt, context, bool(config.get(wire.FREEZE_LORA_A, False)),
                   bool(config.get(wire.LOCAL_LORA_B, False)), float(config.get(wire.PROXIMAL_MU, 0.0)))

    @property
    def model(self):
        return self.rt.loaded.model

    def start(self, msg: Message) -> State:
        """Set the cached model for this message; returns the adapter the site starts from."""
        correction = None
        if wire.BASE_CORRECTION in msg.content.array_records:
            correction = BaseCorrection.from_arrays(from_record(msg.content[wire.BASE_CORRECTION]))
        set_base_correction(self.model, correction)
        state = truncate(from_record(msg.content[wire.ARRAYS]), self.rt.rank)
        if self.local_b:
            initial = {k: np.zeros_like(v) for k, v in trainable_state(self.model).items() if is_factor(k, "B")}
            state.update(load_personal(self.context, initial))
        set_trainable_state(self.model, state)
        return state

    @contextmanager
    def training(self, start: State):
        """For the duration of local training: A frozen (FFA); yields the extra loss term (FedProx) or None."""
        with frozen(self.model, lambda name: self.freeze_a and is_factor(name, "A")):
            if self.proximal_mu > 0:
                device = model_device(self.model)
                anchor = {k: torch.from_numpy(v.copy()).to(device) for k, v in start.items()}
                yield lambda model: proximal_term(model, anchor, self.proximal_mu)
            else:
                yield None

    def update(self, start: State) -> State:
        """What the site sends: local − start for the tensors it shares; keeps its own B."""
        local = trainable_state(self.model)
        if self.local_b:
            save_personal(self.context, {k: v for k, v in local.items() if is_factor(k, "B")})
        return {k: local[k] - start[k] for k in start if uploaded(k, self.freeze_a, self.local_b)}
