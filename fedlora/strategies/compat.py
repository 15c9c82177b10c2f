"""Which strategy works with what, checked once when the configuration is parsed.

Secure aggregation reveals only the weighted sum of the updates, so only
strategies marked `linear` can run under it; client-level DP bounds each
site's contribution to a sum and noises the sum, so it needs the same; and
only some strategies can take sites of a smaller rank. The docs' table is
generated from the same class attributes (`python -m fedlora.strategies.compat`).
"""

from __future__ import annotations

from fedlora.strategies import STRATEGIES, available
from fedlora.strategies.base import Strategy
from fedlora.strategies.ranks import heterogeneous


def _enabled(config, section: str, key: str) -> bool:
    """A feature switch of another section, False where that section does not exist (yet)."""
    return bool(getattr(getattr(config, section, None), key, False))


def strategy_problems(config) -> list[str]:
    """Unknown strategy names and combinations that cannot work, each with the reason."""
    name = config.strategy.name
    cls = STRATEGIES.get(name)
    if cls is None:
        return [f"strategy.name: unknown strategy {name!r}; available: {available()}"]
    problems = []
    if _enabled(config, "secagg", "enabled"):
        if not cls.linear:
            problems.append(f"strategy.name = {name!r} cannot run under secure aggregation (secagg.enabled): "
                            f"the coordinator only learns the sum of the updates, and {name} needs {cls.needs}. "
                            f"Linear strategies: {', '.join(n for n, c in STRATEGIES.items() if c.linear)}")
        if heterogeneous(config):
            problems.append("simulation.site-ranks: under secure aggregation (secagg.enabled) every site must "
                            "mask an update of the same length; heterogeneous ranks are not supported there")
        if config.strategy.norm_bound > 0 or config.strategy.norm_bound_relative > 0:
            problems.append("strategy.norm-bound / norm-bound-relative: the coordinator cannot bound the norm "
                            "of an update it never sees under secure aggregation (secagg.enabled)")
    if _enabled(config, "privacy", "client_dp") and not cls.client_dp:
        problems.append(f"strategy.name = {name!r} cannot be combined with client-level DP (privacy.client-dp): "
                        f"its aggregate is not a sum of bounded updates ({cls.needs}). "
                        f"Usable: {', '.join(n for n, c in STRATEGIES.items() if c.client_dp)}")
    if _enabled(config, "privacy", "enabled") and name == "fedprox":
        problems.append("strategy.name = 'fedprox' with DP-SGD (privacy.enabled): the private training path "
                        "has no proximal term, so the sites would silently train plain FedIT")
    if heterogeneous(config) and not cls.heterogeneous_ranks:
        problems.append(f"simulation.site-ranks: strategy {name!r} cannot take heterogeneous ranks "
                        f"({cls.rank_note}); use one of "
                        f"{', '.join(n for n, c in STRATEGIES.items() if c.heterogeneous_ranks)}")
    if name in ("krum", "multi-krum"):
        need = 2 * config.strategy.byzantine + 3
        if config.federation.min_sites < need:
            problems.append(f"federation.min-sites: {name} with strategy.byzantine = {config.strategy.byzantine} "
                            f"needs at least {need} updates per round; set federation.min-sites >= {need}")
    return problems


def _travels(cls: type[Strategy]) -> tuple[str, str]:
    parts = ["A" if not cls.freeze_a else None, "B" if not cls.local_b else None, "head"]
    up = ", ".join(p for p in parts if p)
    down = "A, head" if cls.local_b else "A, B, head"
    if cls.folds_into_base:
        down += " + base correction"
    return up, down


def compatibility_table() -> str:
    """The markdown table of docs/strategies.md."""
    yes = {True: "yes", False: "no"}
    rows = ["| strategy | exact | secure aggregation | client-level DP | heterogeneous ranks | up | down |",
            "|---|---|---|---|---|---|---|"]
    for name, cls in STRATEGIES.items():
        exact = "n/a (personalized)" if cls.personalized else yes[cls.exact]
        up, down = _travels(cls)
        rows.append(f"| `{name}` | {exact} | {yes[cls.linear]} | {yes[cls.client_dp]} | "
                    f"{yes[cls.heterogeneous_ranks]} | {up} | {down} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(compatibility_table())
