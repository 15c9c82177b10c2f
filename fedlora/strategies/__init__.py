"""LoRA-aware aggregation strategies, one per file, chosen by `strategy.name`.

See docs/strategies.md for what each one does, what travels, and which
combinations (secure aggregation, client-level DP, heterogeneous ranks) work.
"""

from fedlora.strategies.base import SiteUpdate, Strategy
from fedlora.strategies.fedadagrad import FedAdagrad
from fedlora.strategies.fedadam import FedAdam
from fedlora.strategies.fedavgm import FedAvgM
from fedlora.strategies.fedex import FedEx
from fedlora.strategies.fedit import FedIT
from fedlora.strategies.fedprox import FedProx
from fedlora.strategies.fedsa import FedSA
from fedlora.strategies.fedyogi import FedYogi
from fedlora.strategies.ffa import FFA
from fedlora.strategies.flora import FLoRA
from fedlora.strategies.krum import Krum
from fedlora.strategies.median import Median
from fedlora.strategies.multi_krum import MultiKrum
from fedlora.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (
    FedIT, FFA, FLoRA, FedEx, FedSA, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad,
    Median, TrimmedMean, Krum, MultiKrum,
)}


def available() -> str:
    """Every strategy name with its one-line summary, for error messages."""
    return "; ".join(f"{name}: {cls.summary}" for name, cls in STRATEGIES.items())


def build_strategy(config) -> Strategy:
    """The strategy a RunConfig names (config validation has checked the name)."""
    name = config.strategy.name
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; available: {available()}")
    return STRATEGIES[name].from_config(config)


__all__ = ["STRATEGIES", "SiteUpdate", "Strategy", "available", "build_strategy"]
