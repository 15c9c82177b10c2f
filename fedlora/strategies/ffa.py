"""FFA-LoRA: A frozen at its shared initialization, only B (and the head) trained and sent.

Sun et al., 2024, "Improving LoRA in Privacy-preserving Federated Learning".
With A common to all sites, Σ wᵢ Bᵢ·A = (Σ wᵢ Bᵢ)·A: averaging B is exact. The
upload is half of FedIT's, and the aggregate is linear in what is sent, which
makes it the natural partner of secure aggregation and client-level DP.

A is the adapter's initialization, drawn from `model.seed` identically by the
coordinator and every site; the coordinator still sends it down (it never
changes) so that every site, whatever its rank, uses exactly the server's A.
The arithmetic is FedIT's: sites send no A, so A stays as it is (Strategy.combine_kept).
"""

from __future__ import annotations

from fedlora.strategies.fedit import FedIT


class FFA(FedIT):
    name = "ffa"
    summary = "A frozen, B averaged (exact; half the upload)"
    exact = True
    freeze_a = True
