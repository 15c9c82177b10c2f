"""FedSA-LoRA: A shared, B kept at each site (personalization).

Guo et al., 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning": A learns what is common to the sites and is averaged; B captures
what is site-specific and never leaves the site. Each site keeps its B in its
Flower context state (and on its own disk when its node configuration names a
`state-dir`), and evaluates the shared A with its own B. The task head is
shared. The coordinator's copy keeps B at its initialization (zero: sites send
no B, so it stays as it is, Strategy.combine_kept), so the central `test_*`
figures score only the shared part; the sites' pooled `eval_*` figures are the
personalized ones. There is no single global ΔW, so `aggregation_error` is null.
"""

from __future__ import annotations

from fedlora.strategies.fedit import FedIT


class FedSA(FedIT):
    name = "fedsa"
    summary = "A averaged, B kept at each site (personalized)"
    personalized = True
    local_b = True
