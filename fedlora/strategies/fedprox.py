"""FedProx: FedAvg of the factors, with a proximal term at the sites.

Li et al., 2020. Each site adds μ/2·‖θ − θ_global‖² over its trainable adapter
tensors (A, B and the head) to its local loss, which limits client drift on
non-IID data. The coordinator sends μ with every training message; the
aggregation is FedIT's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedlora import wire
from fedlora.options import Problems, Section, option
from fedlora.strategies.fedit import FedIT


@dataclass
class FedProxParams(Section):
    NAME = "strategy.fedprox"
    mu: float = option(0.01, "Weight mu of the proximal term mu/2*||theta - theta_global||^2 on the adapter at "
                             "the sites.")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.mu >= 0, f"{self.NAME}.mu: {self.mu} must be >= 0")
        return p


class FedProx(FedIT):
    name = "fedprox"
    summary = "FedIT plus a proximal term μ/2·‖θ − θ_global‖² at the sites"
    params = FedProxParams

    def client_config(self, server_round: int) -> dict[str, Any]:
        return {**super().client_config(server_round), wire.PROXIMAL_MU: float(self.p.mu)}


def proximal_term(model, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """μ/2 · Σ ‖p − p_anchor‖² over the model's trainable tensors named in `anchor`."""
    total = torch.zeros(())
    for name, p in model.named_parameters():
        if p.requires_grad and name in anchor:
            total = total + torch.sum((p - anchor[name]) ** 2)
    return 0.5 * mu * total
