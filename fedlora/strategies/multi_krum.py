"""Multi-Krum (El Mhamdi et al., 2018): the weighted mean of the m updates with the best
Krum scores (`strategy.multi-krum.keep`; 0: n − f). See krum.py."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.options import option
from fedlora.strategies.krum import Krum, KrumParams


@dataclass
class MultiKrumParams(KrumParams):
    NAME = "strategy.multi-krum"
    keep: int = option(0, "Updates averaged (the best Krum scores); 0: sites - f.")

    def problems(self) -> list[str]:
        p = super().problems()
        if self.keep < 0:
            p.append(f"{self.NAME}.keep: {self.keep} must be >= 0")
        return p


class MultiKrum(Krum):
    name = "multi-krum"
    summary = "mean of the m updates closest to their neighbours (robust)"
    params = MultiKrumParams

    def how_many(self, n: int) -> int:
        return min(self.p.keep, n) if self.p.keep > 0 else n - self.p.byzantine
