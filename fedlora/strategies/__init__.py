"""LoRA-aware aggregation strategies, one per file, chosen by `strategy.name`."""

from fedlora.strategies.base import SiteUpdate, Strategy
from fedlora.strategies.fedit import FedIT

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedIT,)}


def build_strategy(config) -> Strategy:
    """The strategy a RunConfig names (config validation has checked the name)."""
    name = config.strategy.name
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name].from_config(config)


__all__ = ["STRATEGIES", "SiteUpdate", "Strategy", "build_strategy"]
