"""Heterogeneous LoRA ranks: which rank a site trains at.

A deployed site declares `lora-rank` in its node configuration; a simulated
site k takes the k-th entry of `simulation.site-ranks`; otherwise a site uses
`lora.rank`. No site may exceed `lora.rank`, the rank of the global adapter.

A site of rank rᵢ trains the first rᵢ components of the global factors (A's
rows, B's columns) with lora_alpha scaled to alpha·rᵢ/r, so its update means
the same ΔW = (alpha/r)·B·A as everyone else's and zero-padding it back to
rank r is exact.
"""

from __future__ import annotations

import dataclasses

NODE_KEY = "lora-rank"


def site_ranks_problems(config) -> list[str]:
    """Problems with `simulation.site-ranks` for this configuration."""
    ranks, top = config.simulation.site_ranks, config.lora.rank
    if not ranks:
        return []
    problems = []
    if len(ranks) != config.federation.num_sites:
        problems.append(f"simulation.site-ranks: {len(ranks)} ranks for federation.num-sites = "
                        f"{config.federation.num_sites} sites")
    bad = [r for r in ranks if not 1 <= r <= top]
    if bad:
        problems.append(f"simulation.site-ranks: ranks {bad} not in 1..lora.rank = {top}")
    return problems


def heterogeneous(config) -> bool:
    """Whether some simulated site trains below lora.rank."""
    return any(r != config.lora.rank for r in config.simulation.site_ranks)


def site_rank(config, node_config) -> int:
    """The rank a site trains at, from its node configuration or the simulation's list."""
    if NODE_KEY in node_config:
        rank, source = int(node_config[NODE_KEY]), f"node config {NODE_KEY}"
    elif config.simulation.site_ranks and "partition-id" in node_config:
        rank, source = config.simulation.site_ranks[int(node_config["partition-id"])], "simulation.site-ranks"
    else:
        return config.lora.rank
    if not 1 <= rank <= config.lora.rank:
        raise ValueError(f"{source}: rank {rank} is not in 1..lora.rank = {config.lora.rank}")
    return rank


def with_site_rank(config, rank: int):
    """The configuration a site of this rank builds its model from (same ΔW scale)."""
    if rank == config.lora.rank:
        return config
    lora = dataclasses.replace(config.lora, rank=rank, alpha=config.lora.alpha * rank / config.lora.rank)
    return dataclasses.replace(config, lora=lora)
