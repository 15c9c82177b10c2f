"""FedProx: FedAvg of the factors, with a proximal term at the sites.

Li et al., 2020. Each site adds μ/2·‖θ − θ_global‖² over its trainable adapter
tensors (A, B and the head) to its local loss, which limits client drift on
non-IID data. The coordinator sends μ with every training message; the
aggregation is FedIT's.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlora import wire
from fedlora.strategies.fedit import FedIT


class FedProx(FedIT):
    name = "fedprox"
    summary = "FedIT plus a proximal term μ/2·‖θ − θ_global‖² at the sites"

    def __init__(self, mu: float = 0.01, **common):
        super().__init__(**common)
        self.mu = mu

    @classmethod
    def from_config(cls, config) -> "FedProx":
        return cls(mu=config.strategy.proximal_mu, **cls.common_options(config))

    def client_config(self, server_round: int) -> dict[str, Any]:
        return {**super().client_config(server_round), wire.PROXIMAL_MU: float(self.mu)}


def proximal_term(model, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """μ/2 · Σ ‖p − p_anchor‖² over the model's trainable tensors named in `anchor`."""
    total = torch.zeros(())
    for name, p in model.named_parameters():
        if p.requires_grad and name in anchor:
            total = total + torch.sum((p - anchor[name]) ** 2)
    return 0.5 * mu * total
