"""Small LoRA-shaped adapter states and updates for the strategy tests (no model needed)."""

from __future__ import annotations

import numpy as np

from fedlora import config as cfg
from fedlora.strategies import SiteUpdate
from fedlora.strategies.compose import server_strategy
from fedlora.strategies.factors import truncate
from fedlora.wire import LORA_RANK


def a_key(layer: str) -> str:
    return f"m.{layer}.lora_A.default.weight"


def b_key(layer: str) -> str:
    return f"m.{layer}.lora_B.default.weight"


def scalar_state(a: float, b: float, head: float = 0.0) -> dict[str, np.ndarray]:
    """One adapted layer with d = k = r = 1, plus a one-value head."""
    return {a_key("l"): np.array([[a]], np.float32), b_key("l"): np.array([[b]], np.float32),
            "m.head.weight": np.array([head], np.float32)}


def random_state(rng, rank: int = 4, d: int = 6, k: int = 5, layers: int = 2, zero_b: bool = False):
    state = {}
    for i in range(layers):
        state[a_key(f"l{i}")] = rng.normal(size=(rank, k)).astype(np.float32)
        state[b_key(f"l{i}")] = (np.zeros((d, rank)) if zero_b else rng.normal(size=(d, rank))).astype(np.float32)
    state["m.head.weight"] = rng.normal(size=(3, d)).astype(np.float32)
    return state


def random_updates(rng, global_state, ranks, weights, scale: float = 0.1, send_a: bool = True):
    """One update per site, at that site's rank, as a site would send it."""
    out = []
    for i, (rank, weight) in enumerate(zip(ranks, weights)):
        view = truncate(global_state, rank)
        delta = {k: (scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in view.items()
                 if send_a or ".lora_A." not in k}
        out.append(SiteUpdate(f"site-{i}", weight, delta, {LORA_RANK: rank}))
    return out


def strategy(name: str, *sets: str, rank: int = 1, alpha: float = 2.0):
    """The coordinator's strategy (with any wrappers `sets` enable) from a validated configuration
    (scale = alpha / rank)."""
    config = cfg.load_config(None, [f"strategy.name={name}", f"lora.rank={rank}", f"lora.alpha={alpha}",
                                    "federation.num-sites=5", "federation.min-sites=5", *sets])
    return server_strategy(config)
