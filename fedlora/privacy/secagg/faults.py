"""SIMULATION-ONLY fault injection: make chosen simulated sites fail at a protocol stage.

`secagg.simulate-dropouts = "1@masked-input,2@unmask@3"` makes the site with
partition id 1 fail at the masked-input stage of every round, and site 2 at
the unmask stage of round 3. Tests use it to show that dropouts are recovered
(or, below the threshold, that the round fails cleanly). Deployed sites have
no partition id and never fail on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import messages as m


@dataclass(frozen=True)
class Dropout:
    site: int             # partition id of the simulated site
    stage: str            # one of messages.STAGES
    round: int | None     # None: every round

    def hits(self, site: int, stage: str, server_round: int) -> bool:
        return self.site == site and self.stage == stage and self.round in (None, server_round)


def parse_dropouts(text: str) -> list[Dropout]:
    """Parse `site@stage[@round],...`; ValueError naming the bad entry."""
    out = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        parts = entry.split("@")
        if len(parts) not in (2, 3) or parts[1] not in m.STAGES:
            raise ValueError(f"{entry!r} is not site@stage[@round] with stage one of {', '.join(m.STAGES)}")
        try:
            site = int(parts[0])
            server_round = int(parts[2]) if len(parts) == 3 else None
        except ValueError:
            raise ValueError(f"{entry!r}: site and round must be integers") from None
        if site < 0 or (server_round is not None and server_round < 1):
            raise ValueError(f"{entry!r}: site must be >= 0 and round >= 1")
        out.append(Dropout(site, parts[1], server_round))
    return out
