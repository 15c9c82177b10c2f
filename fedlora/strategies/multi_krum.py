"""Multi-Krum (El Mhamdi et al., 2018): the weighted mean of the m updates with the best
Krum scores (`strategy.multi-krum-keep`; 0: n − f). See krum.py."""

from __future__ import annotations

from fedlora.strategies.krum import Krum


class MultiKrum(Krum):
    name = "multi-krum"
    summary = "mean of the m updates closest to their neighbours (robust)"

    def __init__(self, byzantine: int = 1, keep: int = 0, **common):
        super().__init__(byzantine=byzantine, keep=keep, **common)

    @classmethod
    def from_config(cls, config) -> "MultiKrum":
        s = config.strategy
        return cls(byzantine=s.byzantine, keep=s.multi_krum_keep, **cls.common_options(config))

    def how_many(self, n: int) -> int:
        return min(self.keep, n) if self.keep > 0 else n - self.byzantine
