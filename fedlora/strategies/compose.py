"""The coordinator's strategy as a run configures it, and what composes with what.

    DecodedUploads (compression.method)         decode each upload, then ↓
      NormBounded (strategy.norm-bound[-relative])  bound each update's norm, then ↓
        ClientLevelDPStrategy (privacy.client-dp)     clip, sum, noise: one update, then ↓
          the strategy (strategy.name)                  the aggregation arithmetic

Which combinations work is derived from what each piece declares, never from
names: a wrapper that needs each site's own update (`needs_individual`) cannot
run under secure aggregation, where the coordinator learns only the sum; a
wrapper that needs a linear strategy (`needs_linear`) cannot wrap one that is
not (`Strategy.linear`, with what it `needs` instead); a strategy states the
ranks it takes and the fewest updates a round needs (`min_updates`). The docs'
table is generated from the same declarations (`python -m fedlora.strategies.compose`).
"""

from __future__ import annotations

import math

from fedlora.compression import DecodedUploads
from fedlora.privacy.client_dp import ClientLevelDP, ClientLevelDPStrategy
from fedlora.strategies import STRATEGIES, build_strategy
from fedlora.strategies.base import Strategy, StrategyWrapper
from fedlora.strategies.norm_bound import NormBound, NormBounded
from fedlora.strategies.ranks import heterogeneous

SECURE = "secure aggregation (secagg.enabled)"


def _wrappers(config) -> list[tuple[type[StrategyWrapper], str, object]]:
    """The wrappers a configuration asks for, innermost first: (class, the setting, how to build it)."""
    out: list[tuple[type[StrategyWrapper], str, object]] = []
    p = config.privacy
    if p.client_dp:
        out.append((ClientLevelDPStrategy, "privacy.client-dp",
                    lambda s: ClientLevelDPStrategy(s, ClientLevelDP.from_config(p), config.federation.rounds,
                                                    p.client_epsilon or p.epsilon)))
    bound = NormBound.from_config(config)
    if bound.active:
        out.append((NormBounded, "strategy.norm-bound", lambda s: NormBounded(s, bound)))
    method = config.compression.method
    if method != "none":
        out.append((DecodedUploads, f"compression.method = {method!r}", lambda s: DecodedUploads(s, method)))
    return out


def server_strategy(config) -> Strategy:
    """The strategy `strategy.name` names, wrapped in every server-side feature the run enables."""
    strategy = build_strategy(config)
    for _, _, wrap in _wrappers(config):
        strategy = wrap(strategy)
    return strategy


def composition_problems(config) -> list[str]:
    """Every combination of strategy, wrappers, secure aggregation and site ranks that cannot work."""
    name = config.strategy.name
    cls = STRATEGIES.get(name)
    if cls is None:
        return []  # the strategy section reports the unknown name
    problems = []
    wrappers = _wrappers(config)
    if config.secagg.enabled:
        if not cls.linear:
            problems.append(f"strategy.name = {name!r} cannot run under {SECURE}: the coordinator only learns the "
                            f"sum of the updates, and {name} needs {cls.needs}. Linear strategies: "
                            f"{', '.join(n for n, c in STRATEGIES.items() if c.linear)}")
        for wrapper, setting, _ in wrappers:
            if wrapper.needs_individual:
                problems.append(f"{setting} cannot run under {SECURE}: {wrapper.needs_individual}, and the "
                                f"coordinator only learns the sum of the updates{wrapper.under_secure_aggregation}")
        if heterogeneous(config):
            problems.append(f"simulation.site-ranks: under {SECURE} every site must mask an update of the same "
                            "length; heterogeneous ranks are not supported there")
    for wrapper, setting, _ in wrappers:
        if wrapper.needs_linear and not cls.linear:
            problems.append(f"strategy.name = {name!r} cannot be combined with {setting}: {wrapper.needs_linear}, "
                            f"and {name} needs {cls.needs}. Usable: "
                            f"{', '.join(n for n, c in STRATEGIES.items() if c.linear)}")
        if wrapper.needs_same_shapes and heterogeneous(config):
            problems.append(f"{setting}: every site must send an update of the same shape; heterogeneous ranks "
                            "(simulation.site-ranks) are not supported")
    if heterogeneous(config) and not cls.heterogeneous_ranks:
        problems.append(f"simulation.site-ranks: strategy {name!r} cannot take heterogeneous ranks "
                        f"({cls.rank_note}); use one of "
                        f"{', '.join(n for n, c in STRATEGIES.items() if c.heterogeneous_ranks)}")
    needed, setting = build_strategy(config).min_updates()
    if config.federation.min_sites < needed:
        problems.append(f"federation.min-sites: {name} with {setting} needs at least {needed} updates per round; "
                        f"set federation.min-sites >= {needed}")
    sampled = max(1, math.ceil(config.federation.fraction_train * config.federation.num_sites))
    if needed > sampled:
        problems.append(f"federation.fraction-train: {name} needs at least {needed} updates per round, and "
                        f"{config.federation.fraction_train} of {config.federation.num_sites} sites samples {sampled}")
    return problems


def _travels(cls: type[Strategy]) -> tuple[str, str]:
    parts = ["A" if not cls.freeze_a else None, "B" if not cls.local_b else None, "head"]
    up = ", ".join(p for p in parts if p)
    down = "A, head" if cls.local_b else "A, B, head"
    if cls.folds_into_base:
        down += " + base correction"
    return up, down


def compatibility_table() -> str:
    """The markdown table of docs/strategies.md, from the strategies' declarations."""
    yes = {True: "yes", False: "no"}
    rows = ["| strategy | exact | secure aggregation | client-level DP | heterogeneous ranks | up | down |",
            "|---|---|---|---|---|---|---|"]
    for name, cls in STRATEGIES.items():
        exact = "n/a (personalized)" if cls.personalized else yes[cls.exact]
        up, down = _travels(cls)
        # Secure aggregation and client-level DP both need a strategy that works from the sum alone.
        rows.append(f"| `{name}` | {exact} | {yes[cls.linear]} | {yes[cls.linear]} | "
                    f"{yes[cls.heterogeneous_ranks]} | {up} | {down} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(compatibility_table())
